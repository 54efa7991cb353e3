"""The outbound load balancer link: the worker dials `load_balancer.url` and registers itself.

One owned asyncio task keeps the link: connect (with `x-lb-auth`), send `register` then the
status, push every change of status or slots (coalesced by a StatusFeed), answer `ping`, and
after any failure reconnect forever with capped exponential back-off and jitter. Nothing here is
awaited by task processing: the slot manager only sets an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import WSCloseCode, WSMsgType

from worker import __version__
from worker.auth import LB_HEADER
from worker.config import Config
from worker.functions import Registry
from worker.lb_protocol import (
    CLOSE_TIMEOUT,
    MAX_MESSAGE,
    ServiceList,
    StatusFeed,
    close,
    outbound_status,
    ping_reply,
    register,
    send,
    without_credentials,
)
from worker.parts import Part, cancel_and_wait
from worker.slots import SlotManager, SlotState

_log = structlog.get_logger("worker.lb_client")


@dataclass(frozen=True)
class Timings:
    """How the outbound link paces itself (seconds); docs/load-balancer-protocol.md has them."""

    handshake_timeout: float = 10.0  # TCP connect + HTTP upgrade, whatever the balancer does
    heartbeat: float = 15.0  # websocket ping interval; no pong within half of it drops the link
    backoff_first: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 10.0  # a link that stayed up this long resets the back-off
    status_every: float = 10.0  # a status message at least this often, even with no change


class OutboundClient(Part):
    """Keeps one link to `load_balancer.url` while it is set; follows reloads."""

    name = "load balancer link"

    def __init__(
        self,
        slots: SlotManager,
        registry: Registry,
        config: Config,
        services: ServiceList,
        timings: Timings | None = None,
    ) -> None:
        self._slots = slots
        self._registry = registry
        self._config = config
        self._services = services
        self._timings = timings or Timings()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._feed: StatusFeed | None = None
        self._retarget = asyncio.Event()
        self._reregister = False
        self._stopping = False
        self.connected = False
        self.connected_since: float | None = None  # wall clock, for /health
        self.last_error: str | None = None
        self.attempts = 0
        self.reconnects = 0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(headers={"User-Agent": f"base-worker/{__version__}"})
        self._task = asyncio.create_task(self._run(), name="lb-outbound")

    async def stop(self, deadline: float) -> None:
        """Close the link with GOING_AWAY and stop reconnecting."""
        # The connection's own cleanup sends the close frame, with GOING_AWAY from here on.
        self._stopping = True
        await cancel_and_wait(self._task)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def health(self) -> dict[str, Any]:
        url = self._config.load_balancer.url
        since = self.connected_since
        link = {
            "enabled": bool(url),
            "url": without_credentials(url),
            "connected": self.connected,
            "connectedSince": (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else None
            ),
            "lastError": self.last_error,
            "reconnects": self.reconnects,
        }
        return {"loadBalancer": link}

    def apply(self, new: Config) -> None:
        old, self._config = self._config, new
        if (old.load_balancer.url, old.auth.lb_auth_key) != (
            new.load_balancer.url,
            new.auth.lb_auth_key,
        ):
            self._retarget.set()
        else:
            # group, contract or advertise_url may have changed: tell the balancer again.
            self._reregister = True
            if self._feed is not None:
                self._feed.poke()

    async def _run(self) -> None:
        failures = 0
        while True:
            self._retarget.clear()
            url = self._config.load_balancer.url
            if not url:
                self.last_error = None
                await self._retarget.wait()
                failures = 0
                continue
            self.attempts += 1
            if self.attempts > 1:
                self.reconnects += 1
            up_for = await self._connect_and_serve(url)
            if self._retarget.is_set():
                _log.info("load balancer link: configuration changed, reconnecting")
                failures = 0
                continue
            if up_for >= self._timings.stable_after:
                failures = 0
            failures += 1
            delay = self._backoff(failures)
            _log.warning(
                "load balancer unreachable, retrying",
                url=without_credentials(url),
                reason=self.last_error,
                attempt=failures,
                retry_in=round(delay, 2),
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._retarget.wait()

    def _backoff(self, failures: int) -> float:
        """The n-th failure in a row waits 50-100% of min(max, first * 2^(n-1)) seconds."""
        t = self._timings
        ceiling: float = min(t.backoff_max, t.backoff_first * 2.0 ** min(failures - 1, 30))
        return ceiling * random.uniform(0.5, 1.0)

    async def _connect_and_serve(self, url: str) -> float:
        """One connection, from handshake to close; returns how long it was up (0 if never)."""
        assert self._session is not None
        headers = {}
        key = self._config.auth.lb_auth_key
        if key:
            headers[LB_HEADER] = key
        try:
            async with asyncio.timeout(self._timings.handshake_timeout):
                ws = await self._session.ws_connect(
                    url,
                    headers=headers,
                    heartbeat=self._timings.heartbeat,
                    autoping=True,
                    max_msg_size=MAX_MESSAGE,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                )
        except TimeoutError:
            self.last_error = f"handshake timed out after {self._timings.handshake_timeout}s"
            return 0.0
        except aiohttp.WSServerHandshakeError as exc:
            self.last_error = f"handshake refused: HTTP {exc.status} {exc.message}"
            return 0.0
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self.last_error = _describe(exc)
            return 0.0
        started = time.monotonic()
        feed = self._feed = StatusFeed(self._slots, period=self._timings.status_every)
        self.connected, self.connected_since = True, time.time()
        _log.info("load balancer link up", url=without_credentials(url))
        try:
            await self._serve(ws, feed)
        except TimeoutError:
            self.last_error = "send timed out: the balancer is not reading"
        except (ConnectionError, aiohttp.ClientError) as exc:
            self.last_error = _describe(exc)
        finally:
            feed.close()
            self._feed = None
            self.connected, self.connected_since = False, None
            if self._stopping:
                await close(ws, WSCloseCode.GOING_AWAY, b"worker shutting down")
            else:
                await close(ws, WSCloseCode.OK)
        up_for = time.monotonic() - started
        _log.warning(
            "load balancer link down",
            url=without_credentials(url),
            reason=self.last_error,
            up_for=round(up_for, 1),
        )
        return up_for

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, feed: StatusFeed) -> None:
        """Register, then push status and answer pings until the link ends or is retargeted."""
        self._reregister = False
        announced = self._register(self._slots.state())
        await send(ws, announced)
        parts = {
            asyncio.create_task(self._push(ws, feed, announced), name="lb-outbound-status"),
            asyncio.create_task(self._receive(ws), name="lb-outbound-receive"),
            asyncio.create_task(self._retarget.wait(), name="lb-outbound-retarget"),
        }
        try:
            done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
            for part in done:
                part.result()
            if self._retarget.is_set():
                self.last_error = "reconfigured"
                await close(ws, WSCloseCode.OK, b"worker reconfigured")
        finally:
            for part in parts:
                part.cancel()
            await asyncio.gather(*parts, return_exceptions=True)

    async def _push(
        self, ws: aiohttp.ClientWebSocketResponse, feed: StatusFeed, announced: dict[str, Any]
    ) -> None:
        while True:
            state = await feed.next()
            if self._reregister:
                self._reregister = False
                again = self._register(state)
                if _identity(again) != _identity(announced):
                    announced = again
                    await send(ws, announced)
            await send(ws, outbound_status(state, self._services))

    def _register(self, state: SlotState) -> dict[str, Any]:
        return register(self._config, self._registry, state)

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type == WSMsgType.TEXT and message.data.strip() == "ping":
                await send(ws, ping_reply(self._slots.state()))
            elif message.type == WSMsgType.ERROR:
                self.last_error = f"bad frame from the balancer: {message.data}"
                return
            # Anything else is reserved for later versions and ignored.
        self.last_error = f"closed by the balancer (code {ws.close_code})"


def _identity(message: dict[str, Any]) -> dict[str, Any]:
    """What a `register` says about the worker, apart from its slots and status."""
    worker = message["worker"]
    return {k: v for k, v in worker.items() if k not in ("slots", "status")}


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
