"""Talking to systemd (sd_notify): readiness, status lines, watchdog pings, stop extensions.

Silent when the service manager gave no NOTIFY_SOCKET.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import sdnotify

from worker.slots import SlotState

STATUS_INTERVAL = 1.0  # at most one STATUS= line a second


def status_line(state: SlotState) -> str:
    return f"{state.status}: {state.used}/{state.limit} slots busy, {state.queue} queued"


class Notifier:
    """sd_notify messages; `watchdog_interval` is half of WATCHDOG_USEC, or None."""

    def __init__(self, environ: Mapping[str, str], pid: int) -> None:
        self._systemd = sdnotify.SystemdNotifier() if environ.get("NOTIFY_SOCKET") else None
        if self._systemd is not None and self._systemd.socket is not None:
            # A reader that stops reading must cost a dropped message, never a frozen loop.
            self._systemd.socket.setblocking(False)
        self.watchdog_interval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if self._systemd and usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(pid)):
            self.watchdog_interval = int(usec) / 2_000_000
        self._status_sent = 0.0
        self._pending: asyncio.TimerHandle | None = None
        self._latest = ""

    def send(self, *fields: str) -> None:
        if self._systemd is not None:
            self._systemd.notify("\n".join(fields))

    def ready(self, state: SlotState) -> None:
        self._latest = status_line(state)
        self.send("READY=1", f"STATUS={self._latest}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self, text: str) -> None:
        self.send("STOPPING=1", f"STATUS={text}")

    def extend_stop(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def on_slots(self, state: SlotState) -> None:
        """Slot subscriber: a STATUS= line on change, coalesced to one a second."""
        if self._systemd is None:
            return
        self._latest = status_line(state)
        if self._pending is not None:
            return
        wait = self._status_sent + STATUS_INTERVAL - time.monotonic()
        if wait <= 0:
            self._send_status()
        else:
            self._pending = asyncio.get_running_loop().call_later(wait, self._send_status)

    def _send_status(self) -> None:
        self._pending = None
        self._status_sent = time.monotonic()
        self.send(f"STATUS={self._latest}")

    async def watchdog(self) -> None:
        """Ping from the event loop itself, so a stalled loop stops the pings."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
