"""The HTTP API: POST /task, GET /health, GET /logs, POST /on and /off, and the JSON error
middleware. A task's request is checked and validated here, then handed to its mode's answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.hdrs import EXPECT

from worker import __version__, auth, health, logtail, openapi
from worker.config import Config
from worker.context import Mode
from worker.envelope import dead_letter_selection, parse_json, validate_task
from worker.errors import (
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    WorkerError,
)
from worker.functions import Registry
from worker.logs import LogBuffer, Throttle
from worker.maintenance import Maintenance
from worker.metrics import Metrics
from worker.parts import Part
from worker.responses import RETRY_AFTER, json_response
from worker.server import Handler
from worker.slots import REFUSALS, SlotManager
from worker.targets import TargetPolicy
from worker.tasks import TaskSpec

_log = structlog.get_logger("worker.http")


class DeadLetters(Protocol):
    """What the dead-letter routes ask of the webhook mode."""

    async def dead_letters(self) -> list[dict[str, Any]]: ...

    async def redeliver(self, task_ids: list[str] | None) -> int: ...

    async def purge(self, task_ids: list[str] | None) -> int: ...


# How a mode (sync, stream, webhook) answers the request of a task it was handed.
Answer = Callable[[web.Request, TaskSpec], Awaitable[web.StreamResponse]]


def answered(route: str, handler: Handler, metrics: Metrics, refusals: Throttle) -> Handler:
    """`handler` with every error answered as `{"success": false, "error": ...}` with its
    status and headers, a refused credential logged with the remote address (at most a line a
    second each), and every answer counted for /metrics under `route`.

    A wrapper per route rather than an aiohttp middleware: a middleware costs every request
    a chain aiohttp builds and two more coroutines, about 5 us of a sync task's 30."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except WorkerError as exc:
            if isinstance(exc, Unauthorized):
                _log_refusal(refusals, request, exc.message)
            response = json_response(exc.body(), exc.status, dict(exc.headers))
            if exc.closes_connection:
                await _answer_and_close(request, response)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {
                k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")
            }
            response = json_response({"success": False, "error": exc.reason}, exc.status, headers)
        except Exception:
            _log.exception("internal error", path=request.path)
            response = json_response({"success": False, "error": "Internal error"}, 500)
        metrics.request_answered(route, response.status)
        return response

    return answer


def _audit(event: str, request: web.Request, chosen: list[str] | None, count: int) -> None:
    which = (
        "all" if chosen is None else ", ".join(chosen[:20]) + (" ..." if len(chosen) > 20 else "")
    )
    _log.info(event, by=auth.who(request.headers), peer=request.remote, tasks=which, count=count)


def _log_refusal(refusals: Throttle, request: web.Request, reason: str) -> None:
    peer = request.remote or "unknown"
    suppressed = refusals.allow(peer)
    if suppressed is not None:
        _log.warning(
            "unauthorized request",
            peer=peer,
            path=request.path,
            reason=reason,
            suppressed=suppressed,
        )


async def _answer_and_close(request: web.Request, response: web.Response) -> None:
    """Send `response` with `Connection: close`, then close at once: aiohttp would otherwise
    keep reading the rest of a body (lingering) for up to 10 s more."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()  # what was written is sent first


async def _read_body(request: web.Request, limit: int, body_timeout: float) -> bytes:
    """The body, at most `limit` bytes (the application's client_max_size: both are
    `http.max_body_size`, which takes a restart), within `body_timeout`."""
    try:
        if request.content.is_eof():
            # The whole body came with the head: nothing to time, and read() refuses it past
            # the limit as the length's check below would, without reading the header.
            return await request.read()
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(limit)
        async with asyncio.timeout(body_timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except TimeoutError:
        seconds = f"{body_timeout:g}"
        raise RequestTimeout(f"Request body not received within {seconds} s") from None


def _too_large(limit: int) -> PayloadTooLarge:
    # Made only when needed: an exception and its message cost a task that fits.
    return PayloadTooLarge(f"Request body is larger than {limit} bytes")


class Api(Part):
    """The routes; each receives what it uses, and the config follows reloads."""

    name = "http api"

    def __init__(
        self,
        config: Config,
        registry: Registry,
        slots: SlotManager,
        answers: Mapping[Mode, Answer],
        maintenance: Maintenance,
        logs: LogBuffer,
        metrics: Metrics,
        webhooks: DeadLetters,
        sections: Callable[[], dict[str, Any]],
        targets: Callable[[], TargetPolicy] | None = None,
    ) -> None:
        self._webhooks = webhooks  # the dead letters
        self._config = config
        self._registry = registry
        self._slots = slots
        self._answers = answers
        self._maintenance = maintenance
        self._logs = logs
        self._metrics = metrics
        self._sections = sections  # the parts' own sections of the detailed /health
        self._targets = targets  # the webhook target policy in force, checked at submit
        self._task_route: Handler | None = None  # POST /task as app() wrapped it

    def apply(self, new: Config) -> None:
        self._config = new

    def app(self) -> web.Application:
        """The aiohttp application serving these routes (and /openapi, /docs if enabled)."""
        app = web.Application(client_max_size=self._config.http.max_body_size)
        refusals = Throttle()  # refused credentials, per remote address

        def add(method: str, path: str, handler: Handler) -> Handler:
            wrapped = answered(path, handler, self._metrics, refusals)
            if method == "GET":
                app.router.add_get(path, wrapped)  # and HEAD
            else:
                app.router.add_route(method, path, wrapped)
            return wrapped

        async def unmatched(request: web.Request) -> web.StreamResponse:
            """405 naming the methods allowed when a route has this path, else 404."""
            allowed: set[str] = set()
            for resource in app.router.resources():
                if resource is not everything.resource:
                    allowed |= (await resource.resolve(request))[1]
            if allowed:
                raise web.HTTPMethodNotAllowed(request.method, allowed)
            raise web.HTTPNotFound()

        self._task_route = add("POST", "/task", self.post_task)
        add("GET", "/health", self.get_health)
        add("GET", "/ready", self.get_ready)
        add("GET", "/metrics", self.get_metrics)
        add("GET", "/deadletters", self.get_dead_letters)
        add("POST", "/deadletters/redeliver", self.post_redeliver)
        add("POST", "/deadletters/purge", self.post_purge)
        add("GET", "/logs", self.get_logs)
        add("POST", "/off", self.post_off)
        add("POST", "/on", self.post_on)
        if self._config.http.openapi:
            openapi.add_routes(add, self._registry)
        # Last: whatever no route above takes gets its 404 or 405 as JSON, under one label.
        everything = app.router.add_route(
            "*", "/{path:.*}", answered("unmatched", unmatched, self._metrics, refusals)
        )
        return app

    def entry(self, routed: Handler) -> Handler:
        """What the listener calls for every request: POST /task goes to its handler at once,
        anything else to `routed` (the application's router), as does a request that sends
        `Expect`: the router's way answers `100 Continue`.

        The route taken per task skips the router: its resolve, match info and a getpid()
        system call (Python 3.11's get_event_loop) cost a sync task about 5 us of its 45
        in-process (docs/performance.md, eighth pass). The router would hand these requests
        to the same handler, so every request gets the answer it got through the router."""
        task = self._task_route
        assert task is not None, "app() builds the routes first"

        def serve(request: web.Request) -> Awaitable[web.StreamResponse]:
            # Not a coroutine itself: it hands on the handler's, one await less a request.
            if (
                request.method == "POST"
                and request.path == "/task"
                and EXPECT not in request.headers
            ):
                return task(request)
            return routed(request)

        return serve

    async def post_task(self, request: web.Request) -> web.StreamResponse:
        config = self._config
        auth.require_operator(request.headers, config.auth)
        if not self._slots.accepting:
            raise Unavailable(REFUSALS[self._slots.status])
        http = config.http
        body = parse_json(await _read_body(request, http.max_body_size, http.body_timeout))
        spec = validate_task(
            body, self._registry, config.worker.group, config.worker.contract, self._targets
        )
        return await self._answers[spec.mode](request, spec)

    async def get_health(self, request: web.Request) -> web.Response:
        state = self._slots.state()
        config = self._config
        if not auth.sees_details(request.headers, config.auth):
            return json_response({"status": state.status})
        body: dict[str, Any] = {
            "status": state.status,
            "group": config.worker.group,
            "contract": config.worker.contract,
            "websocketPort": config.load_balancer.websocket_port,
            "functions": self._registry.describe(),
            "services": [],
            "tags": await self._registry.compute_tags(),
            "slots": state.as_dict(),
            "system": health.system(),
            "version": __version__,
            **self._sections(),
        }
        return json_response(body)

    async def get_ready(self, request: web.Request) -> web.Response:
        """For plain load balancers: 200 while new tasks are taken, else 503 saying why."""
        status = self._slots.status
        if status == "ready":
            return json_response({"status": status})
        return json_response({"status": status}, 503, {"Retry-After": RETRY_AFTER})

    async def get_metrics(self, request: web.Request) -> web.Response:
        """Prometheus: either key in Authorization (`Bearer ` as Prometheus sends it)."""
        if not auth.sees_details(request.headers, self._config.auth):
            raise Unauthorized("Missing or invalid credentials")
        body, content_type = self._metrics.render(request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def get_dead_letters(self, request: web.Request) -> web.Response:
        auth.require_operator(request.headers, self._config.auth)
        letters = await self._webhooks.dead_letters()
        return json_response({"count": len(letters), "deadletters": letters})

    async def post_redeliver(self, request: web.Request) -> web.Response:
        auth.require_operator(request.headers, self._config.auth)
        chosen = dead_letter_selection(parse_json(await request.read()))
        count = await self._webhooks.redeliver(chosen)
        _audit("dead letters redelivered", request, chosen, count)
        return json_response({"redelivering": count}, 202)

    async def post_purge(self, request: web.Request) -> web.Response:
        auth.require_operator(request.headers, self._config.auth)
        chosen = dead_letter_selection(parse_json(await request.read()))
        count = await self._webhooks.purge(chosen)
        _audit("dead letters purged", request, chosen, count)
        return json_response({"purged": count})

    async def get_logs(self, request: web.Request) -> web.StreamResponse:
        auth.require_any(request.headers, self._config.auth)
        return await logtail.answer(request, self._logs)

    async def post_off(self, request: web.Request) -> web.Response:
        auth.require_operator(request.headers, self._config.auth)
        self._maintenance.set(True)
        _log.info("maintenance mode enabled", by=auth.who(request.headers), peer=request.remote)
        return json_response({"status": "maintenance", "message": "Maintenance mode enabled"})

    async def post_on(self, request: web.Request) -> web.Response:
        auth.require_operator(request.headers, self._config.auth)
        self._maintenance.set(False)
        _log.info("maintenance mode disabled", by=auth.who(request.headers), peer=request.remote)
        return json_response({"status": "ready", "message": "Maintenance mode disabled"})
