"""Talking to systemd (sd_notify): readiness, status lines, watchdog pings, stop extensions.

Silent when the service manager gave no NOTIFY_SOCKET.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Mapping

import sdnotify

from worker.parts import Part, cancel_and_wait
from worker.slots import SlotManager, SlotState

STATUS_INTERVAL = 1.0  # at most one STATUS= line a second


def status_line(state: SlotState) -> str:
    return f"{state.status}: {state.used}/{state.limit} slots busy, {state.queue} queued"


class Notifier:
    """sd_notify messages; `watchdog_interval` is half of WATCHDOG_USEC, or None."""

    def __init__(self, environ: Mapping[str, str], pid: int) -> None:
        self._systemd = _connect(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if self._systemd and usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(pid)):
            self.watchdog_interval = int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        return self._systemd is not None

    def close(self) -> None:
        if self._systemd is not None and self._systemd.socket is not None:
            self._systemd.socket.close()
        self._systemd = None

    def send(self, *fields: str) -> None:
        if self._systemd is not None:
            self._systemd.notify("\n".join(fields))

    def ready(self, state: SlotState) -> None:
        self.send("READY=1", f"STATUS={status_line(state)}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self, text: str) -> None:
        self.send("STOPPING=1", f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask systemd for `seconds` more, while starting (services) or stopping (drain)."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


class _SystemdNotifier(sdnotify.SystemdNotifier):  # type: ignore[misc]
    """sdnotify's sender on the socket we were given: sdnotify's own constructor reads
    os.environ, and leaks a socket when it names none."""

    def __init__(self, sock: socket.socket) -> None:
        self.debug = False
        self.socket = sock


def _connect(address: str) -> _SystemdNotifier | None:
    if not address:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect("\0" + address[1:] if address.startswith("@") else address)
    except OSError:
        sock.close()
        return None  # as sdnotify does: no manager listening, nothing to tell
    # A reader that stops reading must cost a dropped message, never a frozen loop.
    sock.setblocking(False)
    return _SystemdNotifier(sock)


class StatusLine(Part):
    """A STATUS= line whenever the slots change, coalesced to one a second."""

    name = "status notifier"

    def __init__(self, notifier: Notifier, slots: SlotManager) -> None:
        self._notifier = notifier
        self._slots = slots
        self._sent_at = 0.0
        self._pending: asyncio.TimerHandle | None = None
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        if self._notifier.enabled:
            self._unsubscribe = self._slots.subscribe(self._on_slots)

    async def stop(self, deadline: float) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _on_slots(self) -> None:
        # Under load the slots change twice a task: the line is written when it is sent.
        if self._pending is not None:
            return
        wait = self._sent_at + STATUS_INTERVAL - time.monotonic()
        if wait <= 0:
            self._send()
        else:
            self._pending = asyncio.get_running_loop().call_later(wait, self._send)

    def _send(self) -> None:
        self._pending = None
        self._sent_at = time.monotonic()
        self._notifier.send(f"STATUS={status_line(self._slots.state())}")


class Watchdog(Part):
    """WATCHDOG=1 from the event loop itself, so a stalled loop stops the pings."""

    name = "watchdog"

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        interval = self._notifier.watchdog_interval
        if interval is not None:
            self._task = asyncio.create_task(self._ping(interval), name="watchdog")

    async def stop(self, deadline: float) -> None:
        await cancel_and_wait(self._task)

    async def _ping(self, interval: float) -> None:
        while True:
            self._notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)
