"""Accepted tasks: from a place in the queue, through a slot, to a recorded outcome.

Each accepted task runs as a job (its own asyncio task) owned here, apart from the HTTP request
that brought it: a client that hangs up while its task runs does not stop the task, and the
outcome is still counted and logged. One summary line per task is written here and nowhere else.
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
from typing import Any

import structlog

from worker import logs
from worker.context import Mode, StreamWriter, TaskContext
from worker.functions import FunctionSpec
from worker.outcomes import Outcome, Reason, reason_of, verdict
from worker.runner import Runner, RunResult
from worker.slots import Admission, Lease, SlotManager

_log = structlog.get_logger("worker.tasks")
# A result in the debug log: bounded in depth and size, whatever the function returned.
_RESULT_REPR = reprlib.Repr()
_RESULT_REPR.maxstring, _RESULT_REPR.maxother, _RESULT_REPR.maxlist = 200, 100, 20


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A validated task, ready to queue."""

    task_id: str
    function: FunctionSpec
    params: dict[str, Any]
    priority: int = 1
    mode: Mode = "sync"
    webhook: WebhookTarget | None = None


@dataclass(frozen=True, slots=True)
class TaskResult:
    """What became of an accepted task."""

    task_id: str
    outcome: Outcome
    value: Any = None
    error: str | None = None
    queue_wait: float = 0.0
    run_time: float = 0.0
    reason: Reason | None = None


class Job:
    """One accepted task in flight; `running` turns true when it holds a slot."""

    __slots__ = ("admission", "on_start", "reason", "running", "spec", "task")

    def __init__(
        self, spec: TaskSpec, admission: Admission, on_start: Callable[[], None] | None = None
    ) -> None:
        self.spec = spec
        self.admission = admission
        self.on_start = on_start  # told when the task takes its slot (the journal)
        self.running = False
        self.reason: Reason | None = None  # why it was cancelled, once it was
        # The task it runs in: its own (`submit`), or its request's (`run_here`).
        self.task: asyncio.Task[Any]

    def cancel(self, reason: Reason) -> None:
        """Cancel the task, keeping why: asyncio hands the reason to its first reader only."""
        if self.reason is None:
            self.reason = reason
        self.task.cancel(reason)

    def abandon(self) -> None:
        """The client left: a queued task leaves the queue; a running one runs to completion."""
        if not self.running:
            self.cancel(Reason.CLIENT_GONE_QUEUED)

    async def result(self) -> TaskResult:
        """Wait for the outcome on behalf of the client; if the client goes, abandon the task."""
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if self.task.cancelled() and caller is not None and not caller.cancelling():
                return self.finished()  # the client is still here
            self.abandon()
            raise

    def cancel_reason(self) -> Reason:
        """Why a job cancelled before its first step was cancelled."""
        return self.reason if self.reason is not None else Reason.SHUTDOWN

    def finished(self) -> TaskResult:
        """The outcome of a job that is done, also one cancelled before it ever ran."""
        if self.task.cancelled():
            reason = self.cancel_reason()
            return TaskResult(
                self.spec.task_id, Outcome.CANCELLED, error=reason.value, reason=reason
            )
        failure = self.task.exception()
        if failure is not None:  # _run records every outcome itself; this is a bug's trace
            error = f"internal error: {failure!r}"
            return TaskResult(self.spec.task_id, Outcome.FAILED, error=error)
        result: TaskResult = self.task.result()  # a job of `submit`: its task is its _run
        return result


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
        self.counts: Counter[Outcome] = Counter()
        self._jobs: set[Job] = set()
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop run_here last ran on

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
        `promised` before a restart) and start its job."""
        job = Job(spec, self.slots.admit(spec.priority, promised), on_start)
        job.task = asyncio.create_task(self._run(job, stream))
        self._jobs.add(job)
        self._all_done.clear()
        job.task.add_done_callback(lambda _: self._forget(job))
        return job

    async def run_here(self, spec: TaskSpec) -> TaskResult:
        """Run a task in the calling task (mode sync: its request's own), for a caller that saw
        `slots.free`; only the shutdown cancels it.

        No second task, future or shield: the request's handler is not cancelled when its
        client hangs up (worker/server.py), so the task runs to completion where it is."""
        job = Job(spec, self.slots.admit(spec.priority))
        job.task = task = self._current_task()
        self._jobs.add(job)
        self._all_done.clear()
        try:
            result = await self._run(job, None)
        finally:
            self._jobs.discard(job)
            if not self._jobs:
                self._all_done.set()
        if result.reason is not None and job.reason is not None:
            task.uncancel()  # the cancel was ours, and _run has answered it
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

    def _forget(self, job: Job) -> None:
        if job.task.cancelled():
            # Cancelled before its first step, so _run never saw it: give back its place here.
            job.admission.abandon()
            self.counts[Outcome.CANCELLED] += 1
            reason = job.cancel_reason()
            _log.log(
                verdict(Outcome.CANCELLED, reason).level,
                "task",
                task_id=job.spec.task_id,
                function=job.spec.function.name,
                outcome=Outcome.CANCELLED.value,
                error=f"{reason.value} (before start)",
            )
            if self.on_outcome is not None:
                self.on_outcome(job.spec, job.finished())
        self._jobs.discard(job)
        if not self._jobs:
            self._all_done.set()

    async def wait_done(self) -> None:
        """Return once every accepted task has an outcome."""
        await self._all_done.wait()

    def cancel_all(self, reason: Reason = Reason.SHUTDOWN) -> int:
        """Cancel every task still queued or running; returns how many were cancelled."""
        for job in self._jobs:
            job.cancel(reason)
        return len(self._jobs)

    async def _run(self, job: Job, stream: StreamWriter | None) -> TaskResult:
        spec = job.spec
        ctx = TaskContext(
            spec.task_id, spec.function.name, spec.priority, spec.mode, stream, None, self.services
        )
        accepted = time.monotonic()
        started: float | None = None
        lease: Lease | None = None
        result = RunResult(Outcome.CANCELLED)
        try:
            lease = await job.admission.lease()
            job.running = True
            started = time.monotonic()
            if job.on_start is not None:
                job.on_start()
            result = await self.runner.run(spec.function, spec.params, ctx)
        except asyncio.CancelledError as exc:
            reason = job.reason if job.reason is not None else reason_of(exc)
            result = RunResult(Outcome.CANCELLED, error=reason.value, reason=reason)
        finally:
            if lease is not None:
                if result.overrun is not None:
                    lease.release_when_done(result.overrun)
                else:
                    lease.release()
        ended = time.monotonic()
        queue_wait = (started or ended) - accepted
        run_time = ended - started if started is not None else 0.0
        self.counts[result.outcome] += 1
        self._log_summary(spec, result, queue_wait, run_time)
        ended_as = TaskResult(
            spec.task_id,
            result.outcome,
            result.value,
            result.error,
            queue_wait,
            run_time,
            result.reason,
        )
        if self.on_outcome is not None:
            self.on_outcome(spec, ended_as)
        return ended_as

    @staticmethod
    def _log_summary(spec: TaskSpec, result: RunResult, queue_wait: float, run_time: float) -> None:
        fields: dict[str, Any] = {
            "task_id": spec.task_id,
            "function": spec.function.name,
            "outcome": result.outcome.value,
            "priority": spec.priority,
            "mode": spec.mode,
            "queue_wait_ms": round(queue_wait * 1000, 2),
            "run_time_ms": round(run_time * 1000, 2),
        }
        if result.attempts > 1:
            fields["attempts"] = result.attempts
        if result.outcome is not Outcome.SUCCEEDED:
            fields["error"] = result.error
        if result.failure is not None:
            # One field of the same event: journald and JSON readers keep it with its task.
            fields["traceback"] = "".join(traceback.format_exception(result.failure)).rstrip()
        logs.emit(verdict(result.outcome, result.reason).level, "task", fields)
        if (
            result.outcome is Outcome.SUCCEEDED
            and spec.function.log_result
            and logs.enabled(logging.DEBUG)
        ):
            _log.debug(
                "task result",
                task_id=spec.task_id,
                function=spec.function.name,
                result=_RESULT_REPR.repr(result.value)[:500],
            )
