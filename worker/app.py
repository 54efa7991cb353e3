"""Assembles the aiohttp application from the parts; the only module that knows them all."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from worker import logtail, openapi
from worker.http import RUNTIME, add_routes, error_middleware
from worker.lb_client import OutboundClient
from worker.lb_server import InboundServer
from worker.runtime import Runtime


def build_app(runtime: Runtime) -> web.Application:
    """The HTTP application serving `runtime`; background parts start and stop with it."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=runtime.config.http.max_body_size,
    )
    app[RUNTIME] = runtime
    add_routes(app)
    app[logtail.FOLLOWERS] = set()
    app.on_shutdown.append(logtail.stop_following)
    if runtime.config.http.openapi:
        openapi.add_routes(app, runtime.registry)
    app.cleanup_ctx.append(_thread_pool)
    app.cleanup_ctx.append(_load_balancer_links)
    app.cleanup_ctx.append(_webhook_session)
    return app


async def _thread_pool(app: web.Application) -> AsyncIterator[None]:
    yield
    app[RUNTIME].runner.close()


async def _load_balancer_links(app: web.Application) -> AsyncIterator[None]:
    """The inbound websocket server and the outbound link, up before READY=1, closed last."""
    runtime = app[RUNTIME]
    cfg = runtime.config
    server = InboundServer(runtime)
    if cfg.load_balancer.websocket_port:
        await server.start(cfg.http.host, cfg.load_balancer.websocket_port)
    client = OutboundClient(runtime)
    client.start()
    runtime.health_sections["loadBalancer"] = lambda: {
        **client.health(),
        "inbound": server.health(),
    }
    try:
        yield
    finally:
        await client.close()
        await server.close()


async def _webhook_session(app: web.Application) -> AsyncIterator[None]:
    deliveries = app[RUNTIME].deliveries
    await deliveries.open()
    yield
    await deliveries.close()
