"""What both load balancer links say, and when: messages, close codes, and the status feed.

The wire format is written down in docs/load-balancer-protocol.md; keep the two in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from worker import __version__, health
from worker.config import Config
from worker.functions import Registry
from worker.slots import SlotManager, SlotState

CLOSE_UNAUTHORIZED = 4001  # inbound: missing or wrong subprotocol key
MAX_MESSAGE = 64 * 1024  # bytes; a bigger frame from a balancer closes the link (1009)
SEND_TIMEOUT = 10.0  # seconds; a balancer that reads nothing for this long is dropped
CLOSE_TIMEOUT = 2.0  # seconds to wait for the peer's close frame
MIN_GAP = 0.05  # seconds between two slot-change messages on one link; status changes skip it


class Socket(Protocol):
    """Either end of a link: aiohttp's server-side or client-side websocket."""

    async def send_str(self, data: str, compress: int | None = None) -> None: ...

    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...


async def send(ws: Socket, body: dict[str, Any]) -> None:
    """Send one message; TimeoutError when the balancer has not read for SEND_TIMEOUT."""
    async with asyncio.timeout(SEND_TIMEOUT):
        await ws.send_str(json.dumps(body))


async def close(ws: Socket, code: int, message: bytes = b"") -> None:
    """Close with `code`, waiting a bounded time for the peer (aiohttp then drops it)."""
    with contextlib.suppress(TimeoutError, ConnectionError, aiohttp.ClientError):
        async with asyncio.timeout(CLOSE_TIMEOUT + 1):
            await ws.close(code=code, message=message)


def ping_reply(state: SlotState) -> dict[str, Any]:
    """The answer to the text `ping`, on both links."""
    return {"status": state.status, "slots": state.as_dict()}


# The services as /health lists them (`[{"name", "state", "status"}]`), now.
ServiceList = Callable[[], list[dict[str, Any]]]


def inbound_status(state: SlotState, services: ServiceList) -> dict[str, Any]:
    """The inbound link's periodic and on-change message (the Andera worker's shape)."""
    return {
        "status": state.status,
        "slots": state.as_dict(),
        "system": health.system(),
        "services": services(),
    }


def outbound_status(state: SlotState, services: ServiceList) -> dict[str, Any]:
    return {
        "type": "status",
        "status": state.status,
        "slots": state.as_dict(),
        "system": health.system(),
        "services": services(),
    }


def register(cfg: Config, registry: Registry, state: SlotState) -> dict[str, Any]:
    """The first message on the outbound link: who this worker is and where to reach it."""
    return {
        "type": "register",
        "worker": {
            "url": advertise_url(cfg),
            "group": cfg.worker.group,
            "contract": cfg.worker.contract,
            "functions": registry.describe(),
            "slots": state.as_dict(),
            "status": state.status,
            "version": __version__,
        },
    }


def advertise_url(cfg: Config) -> str:
    """`load_balancer.advertise_url`, else http://<http.host>:<http.port> (wildcards: hostname)."""
    if cfg.load_balancer.advertise_url:
        return cfg.load_balancer.advertise_url.rstrip("/")
    host = cfg.http.host
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()  # no DNS look-up on the event loop
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.http.port}"


def without_credentials(url: str) -> str:
    """A URL safe for logs and /health: any `user:password@` and query string are masked."""
    # Up to the last `@` before the path: a password may hold a raw `@` (yarl reads it so).
    url = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#]*@", r"\1***@", url)
    return re.sub(r"\?.*$", "?***", url)


class StatusFeed:
    """Tells one link's sender when its next status message is due.

    Slot changes arrive synchronously from the SlotManager (possibly thousands a second); they
    only set an event here. The sender then sends the state as it is *when it sends*, so a burst
    becomes a few messages and the last one always equals the current state. Changes are
    throttled to one message per `MIN_GAP`, except a change of status (ready, maintenance,
    draining), which is due at once. With `period`, a message is also due that long after the
    previous one.
    """

    def __init__(self, slots: SlotManager, period: float | None) -> None:
        self._slots = slots
        self._period = period
        self._changed = asyncio.Event()
        self._urgent = asyncio.Event()
        self._sent_status = slots.status
        self._sent_at = -math.inf
        self._unsubscribe: Callable[[], None] | None = slots.subscribe(self._on_change)

    def _on_change(self) -> None:
        self._changed.set()
        if self._slots.status != self._sent_status:
            self._urgent.set()

    def poke(self) -> None:
        """Make a message due at once (after a reload, say)."""
        self._changed.set()
        self._urgent.set()

    async def next(self) -> SlotState:
        """Wait until a message is due; returns the state to put in it."""
        loop = asyncio.get_running_loop()
        timeout = None if self._period is None else self._sent_at + self._period - loop.time()
        if timeout is None or timeout > 0:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                pass
        if self._changed.is_set() and not self._urgent.is_set():
            remaining = self._sent_at + MIN_GAP - loop.time()
            if remaining > 0:
                try:
                    async with asyncio.timeout(remaining):
                        await self._urgent.wait()
                except TimeoutError:
                    pass
        self._changed.clear()
        self._urgent.clear()
        state = self._slots.state()
        self._sent_status = state.status
        self._sent_at = loop.time()
        return state

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
