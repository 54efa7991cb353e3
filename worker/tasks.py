"""Accepted tasks: from a place in the queue, through a slot, to a recorded outcome.

Each accepted task is a job owned here. A queued job is only its place in line; given a slot it
runs in its own asyncio task (or, in mode sync or stream with a slot free, in its request's).
A client that hangs up while its sync task runs does not stop the task (a stream stops), and
the outcome is still counted and logged. One summary line per task is written here and nowhere
else.
"""

from __future__ import annotations

import asyncio
import logging
import reprlib
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import structlog

from worker import logs
from worker.context import Mode, StreamWriter, TaskContext
from worker.functions import FunctionSpec
from worker.outcomes import CANCELLED, FAILED, SUCCEEDED, Outcome, Reason, reason_of, verdict
from worker.parts import Waiters
from worker.runner import Runner, RunResult
from worker.slots import Admission, SlotManager

_log = structlog.get_logger("worker.tasks")


def milliseconds(seconds: float) -> float:
    """A duration (not negative) in milliseconds to two places, as `round(seconds * 1000, 2)`
    gives it without formatting and parsing the number (round's way with places; the summary
    line writes two a task). Only a product within a rounding error of a half may round the
    other way: 0.000125 s is 0.13 ms here, 0.12 by round (half to even)."""
    return int(seconds * 100_000.0 + 0.5) / 100.0


# A result in the debug log: bounded in depth and size, whatever the function returned.
_RESULT_REPR = reprlib.Repr()
_RESULT_REPR.maxstring, _RESULT_REPR.maxother, _RESULT_REPR.maxlist = 200, 100, 20


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


class TaskSpec(NamedTuple):
    """A validated task, ready to queue."""

    task_id: str
    function: FunctionSpec
    params: dict[str, Any]
    priority: int = 1
    mode: Mode = "sync"
    webhook: WebhookTarget | None = None


class TaskResult(NamedTuple):
    """What became of an accepted task."""

    task_id: str
    outcome: Outcome
    value: Any = None
    error: str | None = None
    queue_wait: float = 0.0
    run_time: float = 0.0
    reason: Reason | None = None


class Job:
    """One accepted task in flight. It gets its asyncio task only with its slot, so a queued
    task is just its place in line; `running` turns true once the task has begun."""

    __slots__ = (
        "_waiter",
        "accepted",
        "admission",
        "dispatcher",
        "on_end",
        "on_start",
        "outcome",
        "reason",
        "running",
        "spec",
        "stream",
        "task",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        spec: TaskSpec,
        admission: Admission,
        stream: StreamWriter | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.spec = spec
        self.admission = admission
        self.stream = stream
        self.on_start = on_start  # told when the task takes its slot (the journal)
        self.accepted = time.monotonic()
        self.running = False
        self.reason: Reason | None = None  # why it was cancelled, once it was
        # The task it runs in, once it has a slot: its own (`submit`), or its request's
        # (`take_here`).
        self.task: asyncio.Task[Any] | None = None
        self.outcome: TaskResult | None = None  # set once, when it has ended
        self.on_end: list[Callable[[Job], None]] = []  # told once it has ended
        self._waiter: asyncio.Future[None] | None = None  # only while `result()` waits

    def cancel(self, reason: Reason) -> None:
        """Cancel the task, keeping why: asyncio hands the reason to its first reader only."""
        if self.outcome is not None:
            return
        if self.reason is None:
            self.reason = reason
        if self.task is not None:
            self.task.cancel(reason)
        else:  # still queued: it ends here
            self.dispatcher._end_before_start(self)

    def abandon(self) -> None:
        """The client left: a queued task leaves the queue; a running one runs to completion."""
        if not self.running:
            self.cancel(Reason.CLIENT_GONE_QUEUED)

    def start(self) -> None:
        """Its slot is granted: run it (Admission.on_grant)."""
        self.dispatcher._start(self)

    async def result(self) -> TaskResult:
        """Wait for the outcome on behalf of the client; if the client goes, abandon the task."""
        if self.outcome is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self.abandon()
                raise
            finally:
                self._waiter = None
        return self.finished()

    def finished(self) -> TaskResult:
        """The outcome of a job that has ended."""
        assert self.outcome is not None, "the job has not ended"
        return self.outcome

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self.outcome is None:  # cancelled before its first step, so _run never saw it
            self.dispatcher._end_before_start(self)

    def _ended(self, outcome: TaskResult) -> None:
        self.outcome = outcome
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        for callback in self.on_end:
            callback(self)


class Dispatcher:
    """Owns every accepted task until it has an outcome."""

    def __init__(
        self,
        slots: SlotManager,
        runner: Runner,
        services: Mapping[str, Any] | None = None,
        on_outcome: Callable[[TaskSpec, TaskResult], None] | None = None,
    ) -> None:
        self.slots = slots
        self.runner = runner
        self.services = MappingProxyType(services if services is not None else {})
        # Told of every outcome, right after the summary line (the metrics).
        self.on_outcome = on_outcome
        # Tasks ended, by function, mode and outcome; /metrics exports it. A plain dict:
        # adding to a Counter costs twice as much on 3.11.
        self.ended: dict[tuple[str, Mode, Outcome], int] = {}
        self._jobs: set[Job] = set()
        self._done = Waiters()  # told when no job is left in flight (a drain)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop take_here last ran on

    @property
    def counts(self) -> Counter[Outcome]:
        """How many tasks have ended, by outcome."""
        counts: Counter[Outcome] = Counter()
        for (_, _, outcome), count in self.ended.items():
            counts[outcome] += count
        return counts

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def submit(
        self,
        spec: TaskSpec,
        stream: StreamWriter | None = None,
        on_start: Callable[[], None] | None = None,
        promised: bool = False,
    ) -> Job:
        """Queue a task (raises Unavailable when the worker cannot take it, unless it was
        `promised` before a restart); its job starts once it has a slot."""
        job = Job(self, spec, self.slots.admit(spec.priority, promised), stream, on_start)
        self._jobs.add(job)
        if job.admission.granted:
            self._start(job)
        else:
            job.admission.on_grant = job.start
        return job

    def take_here(self, spec: TaskSpec, stream: StreamWriter | None = None) -> Job:
        """The job of a task that takes a free slot now and runs in the calling task (its
        request's own), for a caller that saw `slots.free`; `run_here` runs it, at once.

        No second task, future or shield: the request's handler is not cancelled when its
        client hangs up (worker/server.py). A sync task runs to completion where it is; a
        stream is cancelled through its job (`Job.cancel`), which cancels the calling task."""
        job = Job(self, spec, self.slots.admit(spec.priority), stream)
        assert job.admission.granted, "take_here is for a task with a slot free"
        job.task = self._current_task()
        self._jobs.add(job)
        return job

    async def run_here(self, job: Job) -> TaskResult:
        """Run a job from `take_here` in the task that took it; it ends there."""
        result = await self._run(job)
        task = job.task
        if result.reason is not None and job.reason is not None and task is not None:
            task.uncancel()  # the cancel was ours (Job.cancel), and _run has answered it
        return result

    def _current_task(self) -> asyncio.Task[Any]:
        # With its loop given, current_task() skips get_running_loop(), which on Python 3.11
        # makes a getpid() system call (to notice a fork) every time.
        task = asyncio.current_task(self._loop) if self._loop is not None else None
        if task is None:
            self._loop = asyncio.get_running_loop()
            task = asyncio.current_task(self._loop)
            assert task is not None
        return task

    def _start(self, job: Job) -> None:
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        job.task.add_done_callback(job._task_done)

    def _end_before_start(self, job: Job) -> None:
        """A job cancelled while queued (or granted its slot but not yet begun): it gives back
        its place, or the slot, and ends with the summary line _run would have written."""
        job.admission.abandon()
        reason = job.reason if job.reason is not None else Reason.SHUTDOWN
        cancelled = RunResult(CANCELLED, error=reason.value, reason=reason)
        self._end(job, cancelled, time.monotonic() - job.accepted, 0.0)

    def _end(self, job: Job, result: RunResult, queue_wait: float, run_time: float) -> TaskResult:
        """Count the outcome, write the summary line, tell whoever waits; the job is done."""
        spec = job.spec
        key = (spec.function.name, spec.mode, result.outcome)
        self.ended[key] = self.ended.get(key, 0) + 1
        self._log_summary(spec, result, queue_wait, run_time)
        outcome = TaskResult(
            spec.task_id,
            result.outcome,
            result.value,
            result.error,
            queue_wait,
            run_time,
            result.reason,
        )
        if self.on_outcome is not None:
            self.on_outcome(spec, outcome)
        self._jobs.discard(job)
        if not self._jobs and self._done.futures:
            self._done.wake()
        job._ended(outcome)
        return outcome

    async def wait_done(self) -> None:
        """Return once every accepted task has an outcome."""
        if self._jobs:
            await self._done.wait()

    def cancel_all(self, reason: Reason = Reason.SHUTDOWN) -> int:
        """Cancel every task still queued or running; returns how many were cancelled."""
        jobs = list(self._jobs)
        for job in jobs:
            job.cancel(reason)
        return len(jobs)

    async def _run(self, job: Job) -> TaskResult:
        """Run a job that holds its slot, and end it."""
        spec = job.spec
        held = job.admission  # granted: the slot this job holds
        job.running = True
        started = time.monotonic()
        result: RunResult | None = None
        try:
            if job.on_start is not None:
                job.on_start()
            ctx = TaskContext(
                spec.task_id,
                spec.function.name,
                spec.priority,
                spec.mode,
                job.stream,
                None,
                self.services,
            )
            result = await self.runner.run(spec.function, spec.params, ctx)
        except asyncio.CancelledError as exc:
            reason = job.reason if job.reason is not None else reason_of(exc)
            result = RunResult(CANCELLED, error=reason.value, reason=reason)
        except Exception as exc:  # a bug here must not leave the task without an outcome
            result = RunResult(FAILED, error=f"internal error: {exc!r}")
        finally:
            if result is not None and result.overrun is not None:
                held.release_when_done(result.overrun)
            else:
                held.release()
        return self._end(job, result, started - job.accepted, time.monotonic() - started)

    @staticmethod
    def _log_summary(spec: TaskSpec, result: RunResult, queue_wait: float, run_time: float) -> None:
        meaning = verdict(result.outcome, result.reason)
        fields: dict[str, Any] = {
            "task_id": spec.task_id,
            "function": spec.function.name,
            "outcome": meaning.label,
            "priority": spec.priority,
            "mode": spec.mode,
            "queue_wait_ms": milliseconds(queue_wait),
            "run_time_ms": milliseconds(run_time),
        }
        if result.attempts > 1:
            fields["attempts"] = result.attempts
        if result.outcome is not SUCCEEDED:
            fields["error"] = result.error
        if result.failure is not None:
            # One field of the same event: journald and JSON readers keep it with its task.
            fields["traceback"] = "".join(traceback.format_exception(result.failure)).rstrip()
        logs.emit(meaning.level, "task", fields)
        if result.outcome is SUCCEEDED and spec.function.log_result and logs.enabled(logging.DEBUG):
            _log.debug(
                "task result",
                task_id=spec.task_id,
                function=spec.function.name,
                result=_RESULT_REPR.repr(result.value)[:500],
            )
