"""The HTTP API: POST /task, GET /health, GET /logs, POST /on and /off, and the JSON error
middleware."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from worker import __version__, auth, health, logtail, streaming, webhooks
from worker.envelope import parse_json, validate_task
from worker.errors import PayloadTooLarge, Unavailable, WorkerError
from worker.responses import json_response, result_response
from worker.runtime import Runtime
from worker.tasks import TaskSpec

RUNTIME = web.AppKey("runtime", Runtime)
Answer = Callable[[web.Request, Runtime, TaskSpec], Awaitable[web.StreamResponse]]

_log = structlog.get_logger("worker.http")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error becomes `{"success": false, "error": ...}` with its status and headers."""
    try:
        return await handler(request)
    except WorkerError as exc:
        return json_response(exc.body(), exc.status, dict(exc.headers))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return json_response({"success": False, "error": exc.reason}, exc.status, headers)
    except Exception:
        _log.exception("internal error", path=request.path)
        return json_response({"success": False, "error": "Internal error"}, 500)


async def _read_body(request: web.Request, limit: int) -> bytes:
    too_large = PayloadTooLarge(f"Request body is larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None


async def post_task(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    config = runtime.config
    auth.require_operator(request.headers, config.auth)
    if runtime.slots.status != "ready":
        raise Unavailable("Worker is in maintenance mode")
    body = parse_json(await _read_body(request, config.http.max_body_size))
    spec = validate_task(body, runtime.registry, config.worker.group, config.worker.contract)
    return await ANSWERS[spec.mode](request, runtime, spec)


async def answer_sync(request: web.Request, runtime: Runtime, spec: TaskSpec) -> web.Response:
    job = runtime.dispatcher.submit(spec)
    return result_response(await job.result())


ANSWERS: dict[str, Answer] = {
    "sync": answer_sync,
    "stream": streaming.answer,
    "webhook": webhooks.answer,
}


async def get_health(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    state = runtime.slots.state()
    if not auth.sees_details(request.headers, runtime.config.auth):
        return json_response({"status": state.status})
    config = runtime.config
    body: dict[str, Any] = {
        "status": state.status,
        "group": config.worker.group,
        "contract": config.worker.contract,
        "websocketPort": config.load_balancer.websocket_port,
        "functions": runtime.registry.describe(),
        "services": [],
        "tags": await runtime.registry.compute_tags(),
        "slots": state.as_dict(),
        "system": health.system(),
        "version": __version__,
    }
    for name, section in runtime.health_sections.items():
        body[name] = section()
    body.setdefault("loadBalancer", {"enabled": False})
    return json_response(body)


async def get_logs(request: web.Request) -> web.StreamResponse:
    return await logtail.answer(request, request.app[RUNTIME])


async def post_off(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    auth.require_operator(request.headers, runtime.config.auth)
    runtime.set_maintenance(True)
    _log.info("maintenance mode enabled", status=runtime.slots.status)
    return json_response({"status": "maintenance", "message": "Maintenance mode enabled"})


async def post_on(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    auth.require_operator(request.headers, runtime.config.auth)
    runtime.set_maintenance(False)
    _log.info("maintenance mode disabled")
    return json_response({"status": "ready", "message": "Maintenance mode disabled"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/task", post_task)
    app.router.add_get("/health", get_health)
    app.router.add_get("/logs", get_logs)
    app.router.add_post("/off", post_off)
    app.router.add_post("/on", post_on)
