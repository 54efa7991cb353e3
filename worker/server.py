"""The HTTP listener: serves the API's application on the configured address, or on the sockets
systemd passed (socket activation), and guards the edge where clients connect.

The edge: a new connection must send its first request head within `http.header_timeout`;
between requests aiohttp's keep-alive timer (`http.keepalive_timeout`) bounds the wait for the
next head; the body is the API's (`http.body_timeout`). At most `http.max_connections` are open:
at the bound, a new connection pushes out the oldest one that has not sent a request head yet,
else it is closed at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from yarl import URL

from worker.config import Config
from worker.outbox import Outbox, pass_pieces_on
from worker.parts import Part

# A route's handler, and what the listener calls per request (the application's request
# factory makes web.Request).
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_log = structlog.get_logger("worker.server")
_access = structlog.get_logger("worker.access")

# aiohttp's default of 128 drops SYNs when a load balancer opens hundreds of connections at
# once, and a dropped SYN is retried only a second later (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 1024
SHUTDOWN_TIMEOUT = 5.0  # seconds the closing server waits for requests still being answered
# Descriptors kept for everything but client connections (webhook calls, balancer links,
# websockets, the functions' own files), at most half of the limit.
FD_RESERVE = 256
WARN_EVERY = 10.0  # seconds between two "connection limit" warnings, with counts in between
HEAD_END = b"\r\n\r\n"  # aiohttp's parser accepts no other end of a request head

_HEAD_TIMEOUT_ANSWER = json.dumps(
    {"success": False, "error": "Request headers not received in time"}
).encode()
HEAD_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
    % (len(_HEAD_TIMEOUT_ANSWER), _HEAD_TIMEOUT_ANSWER)
)


def raise_open_file_limit() -> None:
    """Raise this process's open file soft limit to its hard limit (a shell's `ulimit -n` is
    often 1,024: fewer connections than a busy worker holds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        _log.warning("cannot raise the open file limit", soft=soft, hard=hard, reason=str(exc))
        return
    _log.info("open file limit raised", soft=hard, was=soft)


def connection_bound(configured: int) -> int:
    """`configured`, lowered so that the open connections leave FD_RESERVE descriptors free:
    accepting a connection then never fails for want of a descriptor."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - min(FD_RESERVE, soft // 2)))


class Edge:
    """The listener's protocol factory: each connection goes to aiohttp through a `_Connection`
    that times its first request head and counts it against the bound; what aiohttp writes goes
    through the outbox."""

    def __init__(
        self, server: web.Server, header_timeout: float, bound: int, outbox: Outbox
    ) -> None:
        self._server = server
        self.outbox = outbox
        self.header_timeout = header_timeout
        self.bound = bound
        self._open: dict[_Connection, None] = {}
        self._without_head: dict[_Connection, None] = {}  # oldest first
        self.header_timeouts = 0
        self.evicted = 0
        self.refused = 0
        self._warned_at = -math.inf
        self._warned_counts = (0, 0)

    def __call__(self) -> asyncio.Protocol:
        return _Connection(self)

    def admit(self, connection: _Connection) -> web.RequestHandler | None:
        """aiohttp's handler for a new connection, or None to close it: at the bound."""
        if len(self._open) >= self.bound:
            if not self._without_head:
                self.refused += 1
                self._warn()
                return None
            self.evicted += 1
            next(iter(self._without_head)).close()
            self._warn()
        self._open[connection] = None
        self._without_head[connection] = None
        return self._server()

    def head_received(self, connection: _Connection) -> None:
        self._without_head.pop(connection, None)

    def forget(self, connection: _Connection) -> None:
        self._open.pop(connection, None)
        self._without_head.pop(connection, None)

    def health(self) -> dict[str, int]:
        return {
            "connections": len(self._open),
            "maxConnections": self.bound,
            "headerTimeouts": self.header_timeouts,
            "evicted": self.evicted,
            "refused": self.refused,
        }

    def _warn(self) -> None:
        # A flood must not flood the log: one line per WARN_EVERY, counting what happened since.
        now = asyncio.get_running_loop().time()
        if now - self._warned_at < WARN_EVERY:
            return
        evicted, refused = self._warned_counts
        _log.warning(
            "at the connection limit (http.max_connections)",
            limit=self.bound,
            closed_without_request=self.evicted - evicted,
            refused=self.refused - refused,
        )
        self._warned_at = now
        self._warned_counts = (self.evicted, self.refused)


def connected(request: BaseRequest) -> bool:
    """True while the request's client is still connected."""
    return _open_transport(request) is not None


def _open_transport(request: BaseRequest) -> asyncio.Transport | None:
    transport = request.transport
    return None if transport is None or transport.is_closing() else transport


def on_hang_up(request: BaseRequest, callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` once if the client's connection is lost before the returned undo is
    called (at once if it is lost already).

    The listener does not cancel a request's handler when its client goes: a running sync task
    runs to completion in its request's own task. A handler that must give up something when
    its client leaves (a place in the queue, a stream) says so here.
    """
    transport = _open_transport(request)
    if transport is None:
        callback()
        return _nothing
    connection = transport.get_protocol()
    if not isinstance(connection, _Connection):
        return _nothing  # not served by the edge (an in-process harness): nothing to watch
    connection.on_lost = callback

    def undo() -> None:
        if connection.on_lost is callback:
            connection.on_lost = None

    return undo


def _nothing() -> None:
    pass


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's handler gets every event; until the first request head
    is complete, a timer runs and each chunk is searched for the head's end. Later heads on a
    kept-alive connection are bounded by aiohttp's keep-alive timer, and bodies by the API.
    `on_lost` is the current request's hang-up callback (`on_hang_up`), if it set one."""

    __slots__ = ("_edge", "_handler", "_tail", "_timer", "_transport", "on_lost")

    def __init__(self, edge: Edge) -> None:
        self._edge = edge
        self._handler: web.RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes of a head in progress: its end may straddle chunks
        self.on_lost: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._handler = self._edge.admit(self)
        if self._handler is None:
            transport.close()
            return
        self._handler.connection_made(self._edge.outbox.wrap(self._transport))
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._edge.header_timeout, self._head_overdue)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._look_for_head_end(data)
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            self._handler.eof_received()
        return None  # as aiohttp's handler: the transport closes on the client's end of data

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self._edge.forget(self)
        if self._handler is not None:
            self._handler.connection_lost(exc)
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            callback()

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def close(self) -> None:
        """Close a connection that has not sent a request head (the bound needs its place)."""
        self._stop_timer()
        self._edge.forget(self)
        if self._transport is not None:
            self._transport.close()

    def _look_for_head_end(self, data: bytes) -> None:
        # Only head bytes are searched: the search stops at the first head's end, so a body in
        # the same chunk is not read, and later chunks are not looked at.
        if HEAD_END in data or HEAD_END in self._tail + data[: len(HEAD_END) - 1]:
            self._stop_timer()
            self._tail = b""
            self._edge.head_received(self)
        else:
            self._tail = (self._tail + data)[-(len(HEAD_END) - 1) :]

    def _head_overdue(self) -> None:
        self._timer = None
        self._edge.header_timeouts += 1
        if self._tail and self._transport is not None:
            # A head was begun: say why before closing, as for a body too slow (408).
            self._transport.write(HEAD_TIMEOUT_ANSWER)
        self.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _EdgeSite(web.BaseSite):
    """A listening socket whose connections go through the edge (aiohttp's own TCPSite and
    SockSite give them to its handlers directly)."""

    def __init__(
        self,
        runner: web.AppRunner,
        edge: Edge,
        *,
        sock: socket.socket | None = None,
        host: str = "",
        port: int = 0,
    ) -> None:
        super().__init__(runner, backlog=LISTEN_BACKLOG)
        self._edge = edge
        self._sock = sock
        self._host = host
        self._port = port
        self._listening: asyncio.Server | None = None

    @property
    def name(self) -> str:
        bound = self._listening.sockets if self._listening is not None else ()
        if bound:
            address = bound[0].getsockname()
            if bound[0].family == socket.AF_UNIX:
                return f"http://unix:{address}:"
            host = self._host or str(address[0])
            return str(URL.build(scheme="http", host=host, port=int(address[1])))
        return str(URL.build(scheme="http", host=self._host or "0.0.0.0", port=self._port))

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            listening = await loop.create_server(self._edge, sock=self._sock, backlog=self._backlog)
        else:
            listening = await loop.create_server(
                self._edge, self._host, self._port, backlog=self._backlog, reuse_address=True
            )
        self._server = self._listening = listening  # BaseSite.stop closes _server


class HttpServer(Part):
    """The listener; it comes up after every other part and closes before them."""

    name = "http listener"

    def __init__(
        self,
        app: web.Application,
        config: Config,
        inherited: list[socket.socket],
        entry: Callable[[Handler], Handler],
    ):
        self._app = app
        self._entry = entry  # given the application's own entry, what the listener calls
        self._config = config
        self._inherited = inherited
        self._runner: web.AppRunner | None = None
        self._edge: Edge | None = None
        self.addresses: list[str] = []
        self.ports = {config.http.port}  # the bound ports once listening (port 0: ephemeral)

    def apply(self, new: Config) -> None:
        # `logging.access` applies to connections opened from now on.
        self._config = new

    async def start(self) -> None:
        http = self._config.http
        bound = connection_bound(http.max_connections)
        if bound < http.max_connections:
            _log.warning(
                "http.max_connections lowered to fit the open file limit",
                max_connections=bound,
                configured=http.max_connections,
                open_file_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
        runner = web.AppRunner(
            self._app,
            # A client that hangs up does not cancel its handler: a running sync task runs on
            # in it. Handlers that must react say so with `on_hang_up`.
            handler_cancellation=False,
            access_log=logging.getLogger("worker.access"),
            access_log_class=self._access_log_class(),
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            # aiohttp's default (3630 s) kept idle connections, and their file descriptors, for
            # an hour. Its timer runs while the connection waits for a complete request head,
            # from the end of each answer (and from the connection's start), data or not.
            keepalive_timeout=http.keepalive_timeout,
        )
        await runner.setup()
        assert runner.server is not None  # set by setup()
        # Read by each connection's handler when it is made: set before the first one is.
        routed = cast(Handler, runner.server.request_handler)
        runner.server.request_handler = cast(Any, self._entry(routed))
        pass_pieces_on()  # a stream's chunk and its frame reach the outbox unjoined
        edge = Edge(runner.server, http.header_timeout, bound, Outbox(asyncio.get_running_loop()))
        if self._inherited:
            sites = [_EdgeSite(runner, edge, sock=sock) for sock in self._inherited]
        else:
            sites = [_EdgeSite(runner, edge, host=http.host, port=http.port)]
        try:
            for site in sites:
                await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = f"{http.host}:{http.port}"
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
        self._runner = runner
        self._edge = edge
        self.addresses = [site.name for site in sites]
        self.ports = {a[1] for a in runner.addresses if isinstance(a, tuple) and len(a) > 1}

    async def stop(self, deadline: float) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def health(self) -> dict[str, Any]:
        return {"http": self._edge.health()} if self._edge is not None else {}

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
