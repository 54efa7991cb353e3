"""Background work that gives way to arrivals while they keep the CPU busy, within a bound.

A webhook result's delivery is such work. In a burst, each delivery made at once takes CPU from
the accepts, and the burst is taken in at about half the rate of the worker's own sync tasks
(bench (d)). A delivery that waits for the burst to ease costs the same CPU a moment later and
lets the accepts run first; `webhook.max_pending` still bounds what waits, and nothing waits
longer than `longest`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class GiveWay:
    """`arrived()` counts the foreground's arrivals. `call(callback)` calls it at once when the
    process used less than `busy` of a core since it last looked (at least `pause` ago); else
    the callback joins a group called at the first check, one each `pause`, that finds no
    arrival since the one before or the process below `busy`, or once the group has waited
    `longest`."""

    def __init__(self, pause: float, longest: float, busy: float = 0.5) -> None:
        self.pause = pause
        self.longest = longest
        self.busy = busy
        self._arrivals = 0  # ever; compared between two checks
        self._seen = 0
        self._looked: tuple[float, float] | None = None  # (loop time, process CPU seconds)
        self._group: list[Callable[[], None]] | None = None  # waiting now
        self._since = 0.0  # when that group began waiting (loop time)

    @property
    def waiting(self) -> int:
        return len(self._group) if self._group is not None else 0

    def arrived(self) -> None:
        self._arrivals += 1

    def call(self, callback: Callable[[], None]) -> None:
        group = self._group
        if group is None:
            loop = asyncio.get_running_loop()
            now = loop.time()
            if self._looked is None or now - self._looked[0] >= self.pause:
                pressed = self._pressed(now)
                self._seen = self._arrivals
                if not pressed:
                    callback()
                    return
            group = self._group = []
            self._since = now
            loop.call_later(self.pause, self._check, loop, group)
        group.append(callback)

    def release(self) -> None:
        """Call what waits, now; a callback that raises does not keep the others waiting (the
        first error is raised once all were called)."""
        group, self._group = self._group, None
        error: Exception | None = None
        for callback in group or ():
            try:
                callback()
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    def _check(self, loop: asyncio.AbstractEventLoop, group: list[Callable[[], None]]) -> None:
        if group is not self._group:
            return  # released already
        now = loop.time()
        pressed = self._arrivals != self._seen and self._pressed(now)
        self._seen = self._arrivals
        if pressed and now - self._since < self.longest:
            loop.call_later(self.pause, self._check, loop, group)
        else:
            self.release()

    def _pressed(self, now: float) -> bool:
        """Whether the process used `busy` of a core or more since it last looked; looks now."""
        cpu = time.process_time()
        looked, self._looked = self._looked, (now, cpu)
        if looked is None:
            return False
        then, cpu_then = looked
        return cpu - cpu_then >= self.busy * (now - then)
