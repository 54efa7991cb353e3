"""The inbound load balancer link: the websocket the Andera load balancer opens to each worker.

It listens on `load_balancer.websocket_port` (same host as HTTP, same event loop). A balancer
authenticates by offering LB_AUTH_KEY as its websocket subprotocol, which is selected (echoed);
anyone else gets the socket opened and closed at once with 4001, nothing sent before the close.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, hdrs, web

from worker.config import Config
from worker.lb_protocol import (
    CLOSE_TIMEOUT,
    CLOSE_UNAUTHORIZED,
    MAX_MESSAGE,
    ServiceList,
    StatusFeed,
    close,
    inbound_status,
    ping_reply,
    send,
)
from worker.logs import Throttle
from worker.parts import Part
from worker.slots import SlotManager

_log = structlog.get_logger("worker.lb_server")

STATUS_EVERY = 1.0  # seconds between status messages when nothing changes
HEARTBEAT = 20.0  # websocket-level ping; a peer that misses the pong for HEARTBEAT/2 is dropped


class InboundServer(Part):
    """A websocket server for any number of balancers, beside the HTTP listener."""

    name = "load balancer websocket"

    def __init__(self, slots: SlotManager, config: Config, services: ServiceList) -> None:
        self._slots = slots
        self._config = config
        self._services = services
        self._links: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.refused = 0
        self._refusals = Throttle()  # one line a second per address: anyone can knock

    async def start(self) -> None:
        """Bind and serve when `load_balancer.websocket_port` is set; OSError when it cannot."""
        port = self._config.load_balancer.websocket_port
        if port:
            await self._listen(self._config.http.host, port)

    def apply(self, new: Config) -> None:
        self._config = new

    async def _listen(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=1,
            # A connection that never sends its upgrade request is closed after this, as on the
            # HTTP port (aiohttp's default kept it for an hour); an open websocket is not idle.
            keepalive_timeout=self._config.http.keepalive_timeout,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            _log.error("cannot listen for load balancers", host=host, port=port, reason=str(exc))
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = port
        _log.info("load balancer websocket listening", host=host, port=port)
        if not self._config.auth.lb_auth_key:
            _log.warning(
                "auth.lb_auth_key is empty: every load balancer websocket will be refused (4001)"
            )

    async def stop(self, deadline: float) -> None:
        """Close every link with GOING_AWAY, then stop listening."""
        if self._runner is None:
            return
        await asyncio.gather(*(close(ws, WSCloseCode.GOING_AWAY) for ws in self._links))
        await self._runner.cleanup()
        self._runner = None

    def health(self) -> dict[str, Any]:
        inbound = {"port": self.port, "connections": len(self._links), "refused": self.refused}
        return {"loadBalancer": {"inbound": inbound}}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = self._config.auth.lb_auth_key
        offered = [
            token.strip()
            for token in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",")
            if token.strip()
        ]
        chosen = next((token for token in offered if _same(token, key)), None)
        if chosen is None:
            return await self._refuse(request, len(offered))
        ws = web.WebSocketResponse(
            protocols=(chosen,),
            heartbeat=HEARTBEAT,
            compress=False,
            max_msg_size=MAX_MESSAGE,
            timeout=CLOSE_TIMEOUT,
        )
        await ws.prepare(request)
        self._links.add(ws)
        feed = StatusFeed(self._slots, period=STATUS_EVERY)
        sender = asyncio.create_task(self._push(ws, feed), name="lb-inbound-status")
        peer = request.remote
        _log.info("load balancer connected (inbound)", peer=peer, connections=len(self._links))
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT and message.data.strip() == "ping":
                    await send(ws, ping_reply(self._slots.state()))
                # Anything else is ignored: the Andera balancer sends only `ping`.
        except (TimeoutError, ConnectionError) as exc:
            _log.warning("load balancer link (inbound) failed", peer=peer, reason=str(exc))
        finally:
            sender.cancel()
            feed.close()
            self._links.discard(ws)
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await close(ws, WSCloseCode.OK)
        _log.info(
            "load balancer disconnected (inbound)",
            peer=peer,
            code=ws.close_code,
            connections=len(self._links),
        )
        return ws

    async def _refuse(self, request: web.Request, offered: int) -> web.WebSocketResponse:
        self.refused += 1
        # Never log the offered protocols: a wrong key may still be someone's secret. aiohttp's
        # own handshake would log them, so it sees a request without the header.
        headers = request.headers.copy()
        headers.popall(hdrs.SEC_WEBSOCKET_PROTOCOL, None)
        ws = web.WebSocketResponse(compress=False, timeout=CLOSE_TIMEOUT)
        await ws.prepare(request.clone(headers=headers))
        peer = request.remote or "unknown"
        suppressed = self._refusals.allow(peer)
        if suppressed is not None:
            _log.warning(
                "load balancer websocket refused: missing or wrong key in Sec-WebSocket-Protocol",
                peer=peer,
                protocols_offered=offered,
                suppressed=suppressed,
            )
        await close(ws, CLOSE_UNAUTHORIZED, b"Unauthorized")
        return ws

    async def _push(self, ws: web.WebSocketResponse, feed: StatusFeed) -> None:
        """Send the status at once, then every second and on every change."""
        try:
            while not ws.closed:
                await send(ws, inbound_status(await feed.next(), self._services))
        except (TimeoutError, ConnectionError) as exc:
            # A balancer that stopped reading: drop it rather than buffer for it.
            _log.warning("load balancer link (inbound) stalled, closing", reason=str(exc))
            await close(ws, WSCloseCode.POLICY_VIOLATION)


def _same(offered: str, key: str) -> bool:
    return bool(key) and hmac.compare_digest(offered.encode(), key.encode())
