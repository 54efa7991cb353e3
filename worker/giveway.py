"""Background work that gives way to arrivals while they keep the CPU busy, within a bound.

A webhook result's delivery is such work. In a burst, each delivery made at once takes CPU from
the accepts, and the burst is taken in at about half the rate of the worker's own sync tasks
(bench (d)). A delivery that waits for the burst to ease costs the same CPU a moment later and
lets the accepts run first; `webhook.max_pending` still bounds what waits, and nothing waits
longer than `longest`.

Busy means the loop's thread ran, or waited to run, for `busy` of the time: on a machine whose
cores are shared, a worker that wants the CPU but waits for it is busy too, though its CPU time
alone reads low (bench (d) beside a process spinning: released mid-burst 138 times in five bursts).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable

SCHEDSTAT = "/proc/thread-self/schedstat"  # ns on a CPU, ns waiting on a run queue, slices


def thread_demand() -> float:
    """Seconds this thread ran or waited to run; NaN when the kernel could not say this time
    (a look that reads NaN finds the thread not busy)."""
    try:
        fd = os.open(SCHEDSTAT, os.O_RDONLY)
    except OSError:
        return math.nan
    try:
        ran, waited = os.read(fd, 64).split()[:2]
        return (int(ran) + int(waited)) / 1e9
    except (OSError, ValueError):
        return math.nan
    finally:
        os.close(fd)


def demand_clock() -> Callable[[], float]:
    """`thread_demand` where the kernel keeps it (Linux with schedstats), else the process's
    CPU time."""
    return thread_demand if not math.isnan(thread_demand()) else time.process_time


class GiveWay:
    """`arrived()` counts the foreground's arrivals. `call(callback)` calls it at once when the
    loop's thread was busy less than `busy` of the time since it last looked (at least `pause`
    ago); else the callback joins a group called at the first check, one each `pause`, that
    finds no arrival since the one before or the thread below `keep` (half of `busy` unless
    given), or once the group has waited `longest`.

    `keep` is below `busy` because a group released goes all at once: a dip in the middle of a
    burst puts every delivery it holds into the burst (bench (d) beside two spinning processes:
    three bursts of six released early with `keep` as `busy`; none of nine with half, beside
    two, one or no such process)."""

    def __init__(
        self, pause: float, longest: float, busy: float = 0.5, keep: float | None = None
    ) -> None:
        self.pause = pause
        self.longest = longest
        self.busy = busy
        self.keep = busy / 2 if keep is None else keep
        self._demand = demand_clock()
        self._arrivals = 0  # ever; compared between two checks
        self._seen = 0
        self._looked: tuple[float, float] | None = None  # (loop time, demand seconds)
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
                pressed = self._pressed(now, self.busy)
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
        pressed = self._arrivals != self._seen and self._pressed(now, self.keep)
        self._seen = self._arrivals
        if pressed and now - self._since < self.longest:
            loop.call_later(self.pause, self._check, loop, group)
        else:
            self.release()

    def _pressed(self, now: float, share: float) -> bool:
        """Whether the loop's thread was busy `share` of the time or more since it last looked;
        looks now."""
        demand = self._demand()
        looked, self._looked = self._looked, (now, demand)
        if looked is None:
            return False
        then, demand_then = looked
        return demand - demand_then >= share * (now - then)
