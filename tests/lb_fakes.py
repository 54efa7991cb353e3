"""Tiny load balancers on loopback, for the outbound link's tests: a well-behaved one, a
misbehaving one, and raw TCP servers that refuse or stall the handshake."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, Literal

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.test_utils import unused_port

Behaviour = Literal["normal", "garbage", "close"]


class FakeBalancer:
    """Accepts workers on ws://127.0.0.1:<port>/workers and records what they send."""

    def __init__(self, key: str, port: int | None = None, behaviour: Behaviour = "normal") -> None:
        self.key = key
        self.port = port or unused_port()
        self.behaviour = behaviour
        self.received: list[tuple[float, dict[str, Any]]] = []  # (monotonic time, message)
        self.handshakes: list[float] = []
        self.refused = 0
        self.close_codes: list[int | None] = []
        self.sockets: dict[web.WebSocketResponse, asyncio.BaseTransport | None] = {}
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/workers"

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [message for _, message in self.received]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/workers", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        """Go away abruptly, as a killed process would: no close frame."""
        for transport in list(self.sockets.values()):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def send_ping(self) -> None:
        for ws in list(self.sockets):
            await ws.send_str("ping")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("x-lb-auth") != self.key:
            self.refused += 1
            raise web.HTTPUnauthorized()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.handshakes.append(time.monotonic())
        if self.behaviour == "close":
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"go away")
            return ws
        if self.behaviour == "garbage":
            await ws.send_bytes(b"\x00\xff" * 100)
            await ws.send_str("{not json")
            await ws.send_str(json.dumps({"type": "nonsense", "data": [1, 2, 3]}))
            await ws.send_str("x" * (128 * 1024))  # over the worker's message limit: it hangs up
        self.sockets[ws] = request.transport
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self.received.append((time.monotonic(), json.loads(message.data)))
        finally:
            self.sockets.pop(ws, None)
            self.close_codes.append(ws.close_code)
        return ws


class RawServer:
    """A TCP server that never speaks HTTP: it either reads forever or hangs up at once."""

    def __init__(self, port: int | None = None, *, hang_up: bool = False) -> None:
        self.port = port or unused_port()
        self.hang_up = hang_up
        self.accepted: list[float] = []
        self.ended = 0  # connections the worker closed
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/workers"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for handler in list(self._handlers):
                handler.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted.append(time.monotonic())
        try:
            if not self.hang_up:
                # Read (bounded) until the worker gives up on us; never answer.
                async with asyncio.timeout(30):
                    while await reader.read(4096):
                        pass
                self.ended += 1
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._handlers.discard(task)
