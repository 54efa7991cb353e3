"""The HTTP listener: serves the API's application on the configured address, or on the sockets
systemd passed (socket activation)."""

from __future__ import annotations

import logging
import socket

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from worker.config import Config
from worker.parts import Part

_log = structlog.get_logger("worker.server")
_access = structlog.get_logger("worker.access")

# aiohttp's default of 128 drops SYNs when a load balancer opens hundreds of connections at
# once, and a dropped SYN is retried only a second later (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 1024
SHUTDOWN_TIMEOUT = 5.0  # seconds the closing server waits for requests still being answered


class HttpServer(Part):
    """The listener; it comes up after every other part and closes before them."""

    name = "http listener"

    def __init__(self, app: web.Application, config: Config, inherited: list[socket.socket]):
        self._app = app
        self._config = config
        self._inherited = inherited
        self._runner: web.AppRunner | None = None
        self.addresses: list[str] = []
        self.ports = {config.http.port}  # the bound ports once listening (port 0: ephemeral)

    def apply(self, new: Config) -> None:
        # `logging.access` applies to connections opened from now on.
        self._config = new

    async def start(self) -> None:
        http = self._config.http
        runner = web.AppRunner(
            self._app,
            handler_cancellation=True,
            access_log=logging.getLogger("worker.access"),
            access_log_class=self._access_log_class(),
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        if self._inherited:
            sites: list[web.BaseSite] = [web.SockSite(runner, sock) for sock in self._inherited]
        else:
            sites = [
                web.TCPSite(
                    runner, http.host, http.port, reuse_address=True, backlog=LISTEN_BACKLOG
                )
            ]
        try:
            for site in sites:
                await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = f"{http.host}:{http.port}"
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
        self._runner = runner
        self.addresses = [site.name for site in sites]
        self.ports = {a[1] for a in runner.addresses if isinstance(a, tuple) and len(a) > 1}

    async def stop(self, deadline: float) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _access_log_class(self) -> type[AbstractAccessLogger]:
        server = self

        class AccessLog(AbstractAccessLogger):
            """One line per request when `logging.access` is on; aiohttp asks `enabled` once
            per connection, so with it off a request costs nothing here."""

            @property
            def enabled(self) -> bool:
                return server._config.logging.access

            def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
                _access.info(
                    "request",
                    method=request.method,
                    path=request.path,
                    status=response.status,
                    bytes=response.body_length,
                    duration_ms=round(time * 1000, 2),
                    peer=request.remote,
                )

        return AccessLog
