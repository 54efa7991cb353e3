"""Parallel slots with a bounded priority queue behind them.

`admit()` decides at once whether a task may wait for a slot (maintenance, draining and a full
queue say no there); `Admission.lease()` waits for the slot itself. The slot is handed straight
from a finishing task to the most urgent waiter, so nothing can overtake the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
from collections.abc import Callable
from typing import Literal, NamedTuple

from worker.config import Config
from worker.errors import Unavailable
from worker.parts import Part, Waiters

# What the worker says about itself to /health, /ready, systemd and the load balancers: "may I
# send you work". Each condition but ready is held (or not) on its own; the status is the
# first held in this order.
Condition = Literal["draining", "starting", "maintenance", "degraded"]
Status = Literal["ready", "draining", "starting", "maintenance", "degraded"]
PRECEDENCE: tuple[Condition, ...] = ("draining", "starting", "maintenance", "degraded")
# Called after every change; reads `state()` or `status` when it needs them (most calls under
# load find a message already due and need nothing: no snapshot is made for them).
Subscriber = Callable[[], None]
REFUSALS: dict[Status, str] = {
    "draining": "Worker is draining for shutdown",
    "starting": "Worker is starting",
    "maintenance": "Worker is in maintenance mode",
    "degraded": "Worker is degraded: a required service is down",
}


class SlotState(NamedTuple):
    """A snapshot of the slots, as /health, the load balancer and systemd report it."""

    status: Status
    used: int
    limit: int
    queue: int

    @property
    def available(self) -> int:
        return max(self.limit - self.used, 0) if self.status == "ready" else 0

    def as_dict(self) -> dict[str, int]:
        return {
            "used": self.used,
            "available": self.available,
            "limit": self.limit,
            "queue": self.queue,
        }


class Admission:
    """A place in line: already granted a slot, or queued for one. A queued place is told of
    its slot by `on_grant` (a job starts its task only then), or waited for with `lease()`.
    Once granted it is the slot held, given back exactly once (`release`, or `abandon` when
    it was never used). One object for both, so a task makes no second one for its slot."""

    __slots__ = (
        "_future",
        "_manager",
        "_released",
        "abandoned",
        "granted",
        "on_grant",
        "priority",
        "seq",
    )

    def __init__(self, manager: SlotManager, priority: int, seq: int, granted: bool) -> None:
        self._manager = manager
        self.abandoned = False
        self.granted = granted
        self.priority = priority
        self.seq = seq
        self.on_grant: Callable[[], None] | None = None
        self._future: asyncio.Future[None] | None = None  # only while lease() waits
        self._released = False

    def __lt__(self, other: Admission) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)

    @property
    def waiting(self) -> bool:
        """True while queued for a slot."""
        return not self.granted and not self.abandoned

    async def lease(self) -> Admission:
        """Wait for the slot (this admission, granted); cancelling this leaves the queue
        without ever taking one."""
        if not self.granted:
            if self.abandoned:
                raise asyncio.CancelledError
            self._future = asyncio.get_running_loop().create_future()
            try:
                await self._future
            except asyncio.CancelledError:
                self.abandon()
                raise
            finally:
                self._future = None
        return self

    def release(self) -> None:
        """Give the granted slot back (once; again is a no-op)."""
        if not self._released:
            self._released = True
            self._manager._release()

    def release_when_done(self, work: concurrent.futures.Future[object]) -> None:
        """Keep the slot until `work` (a thread that cannot be killed) really returns."""
        loop = asyncio.get_running_loop()
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(self.release))

    def abandon(self) -> None:
        """Give up this place: leave the queue, or give back a slot granted but never used."""
        self._manager._abandon(self)

    def _grant(self) -> None:
        self.granted = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        if self.on_grant is not None:
            on_grant, self.on_grant = self.on_grant, None
            on_grant()


class SlotManager(Part):
    """`limit` parallel slots, a queue of at most `max_queue` behind them, and the worker status."""

    name = "slots"

    def __init__(self, limit: int, max_queue: int) -> None:
        self._limit = limit
        self._max_queue = max_queue
        self._held: set[Condition] = set()
        self._status: Status = "ready"
        self._grace = False  # draining, yet still taking tasks (worker.drain_grace)
        # True while new tasks are taken: when ready, and during a drain's grace period. Read
        # only; set where the status or the grace changes. A sync task reads it three times,
        # and on Python 3.11 each read of a property costs some 700 instructions.
        self.accepting = True
        self._used = 0
        self._queued = 0
        self._heap: list[Admission] = []
        self._seq = itertools.count()
        # A tuple, replaced on (un)subscribe: a change calls each without copying the list.
        self._subscribers: tuple[Subscriber, ...] = ()
        self._idle = Waiters()  # told when no slot is used and nothing is queued (a drain)

    def state(self) -> SlotState:
        return SlotState(self._status, self._used, self._limit, self._queued)

    @property
    def status(self) -> Status:
        return self._status

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber()` after every change; returns the function that unsubscribes."""
        self._subscribers += (subscriber,)

        def unsubscribe() -> None:
            kept = list(self._subscribers)
            kept.remove(subscriber)
            self._subscribers = tuple(kept)

        return unsubscribe

    @property
    def free(self) -> bool:
        """True when a task admitted now gets a slot at once."""
        return self._used < self._limit and self._queued == 0 and self.accepting

    def hold(self, condition: Condition, on: bool = True) -> None:
        """Hold (or lift) one condition; the status is the first held in PRECEDENCE."""
        if on:
            self._held.add(condition)
        else:
            self._held.discard(condition)
        status: Status = next((c for c in PRECEDENCE if c in self._held), "ready")
        if status != self._status:
            self._status = status
            self._set_accepting()
            self._changed()

    def set_grace(self, on: bool) -> None:
        """While draining, keep taking tasks (a balancer that polls /ready routes for a while)."""
        self._grace = on
        self._set_accepting()

    def _set_accepting(self) -> None:
        self.accepting = self._status == "ready" or (self._grace and self._status == "draining")

    def set_max_queue(self, max_queue: int) -> None:
        self._max_queue = max_queue

    def apply(self, new: Config) -> None:
        self.resize(new.worker.slots)
        self.set_max_queue(new.worker.max_queue)

    def resize(self, limit: int) -> None:
        """Change the slot count live; shrinking never cancels work, it only stops handing out."""
        if limit < 1:
            raise ValueError("slots must be at least 1")
        self._limit = limit
        self._grant_waiting()
        self._changed()

    def admit(self, priority: int, promised: bool = False) -> Admission:
        """Take a place for a new task, or refuse it with the 503 the client should get; a
        `promised` task (accepted before a restart) is never refused."""
        if not self.accepting and not promised:
            raise Unavailable(REFUSALS[self._status])
        if self._used < self._limit and self._queued == 0:
            self._used += 1
            admission = Admission(self, priority, next(self._seq), granted=True)
        elif self._queued >= self._max_queue and not promised:
            raise Unavailable(f"Queue is full ({self._max_queue} tasks waiting)")
        else:
            admission = Admission(self, priority, next(self._seq), granted=False)
            heapq.heappush(self._heap, admission)
            self._queued += 1
        self._changed()
        return admission

    async def wait_idle(self) -> None:
        """Return once no slot is used and nothing is queued."""
        if self._used != 0 or self._queued != 0:
            await self._idle.wait()

    def _abandon(self, admission: Admission) -> None:
        if admission.abandoned:
            return
        admission.abandoned = True
        if admission.granted:
            # The slot was handed over just as the waiter was cancelled: pass it on.
            admission.release()
            return
        if admission._future is not None:
            admission._future.cancel()
        admission.on_grant = None
        self._queued -= 1  # and it is removed from the heap lazily
        if len(self._heap) > 64 and len(self._heap) > 2 * self._queued:
            self._heap = [a for a in self._heap if a.waiting]
            heapq.heapify(self._heap)
        self._changed()

    def _release(self) -> None:
        self._used -= 1
        self._grant_waiting()
        self._changed()

    def _grant_waiting(self) -> None:
        while self._used < self._limit and self._heap:
            admission = heapq.heappop(self._heap)
            if not admission.waiting:
                continue
            self._queued -= 1
            self._used += 1
            admission._grant()

    def _changed(self) -> None:
        if self._idle.futures and self._used == 0 and self._queued == 0:
            self._idle.wake()
        for subscriber in self._subscribers:
            subscriber()
