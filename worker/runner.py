"""Running one function call: its three forms, its timeout and its retries; and the thread pool
that plain `def` functions run in."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import time
import types
from collections.abc import Coroutine, Generator
from typing import Any, NamedTuple

from worker.config import Config
from worker.context import TaskContext
from worker.functions import FunctionSpec
from worker.outcomes import FAILED, SUCCEEDED, TIMED_OUT, Outcome, Reason
from worker.parts import Part


class RunResult(NamedTuple):
    """How a call ended. `overrun` is the thread still running after a timeout, if any.

    A NamedTuple, like TaskSpec and TaskResult: made for every task, immutable, and built in
    a third of a frozen dataclass's time (which sets each field through object.__setattr__)."""

    outcome: Outcome
    value: Any = None
    error: str | None = None
    attempts: int = 1
    overrun: concurrent.futures.Future[Any] | None = None
    reason: Reason | None = None
    failure: BaseException | None = None  # what the function raised, for the log's traceback


class Deadline:
    """One call's timeout: when it passes, the task running the call is cancelled."""

    __slots__ = ("cancelling", "fired", "task", "when")

    def __init__(self, when: float, task: asyncio.Task[Any]) -> None:
        self.when = when
        self.task = task
        self.cancelling = task.cancelling()  # cancels asked before: not ours to absorb
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.task.cancel(Reason.TIMEOUT)

    def expired(self) -> bool:
        """True when a CancelledError in the call is this deadline's (then absorbed)."""
        if not self.fired:
            return False
        self.fired = False
        return self.task.uncancel() <= self.cancelling

    def settle(self) -> None:
        """The call ended another way after the deadline fired: take its cancel back."""
        if self.fired:
            self.fired = False
            self.task.uncancel()


class _Lane:
    """The deadlines of one timeout length, in the order they pass (one clock, one length),
    behind a single timer of the event loop."""

    __slots__ = ("deadlines", "loop", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.deadlines: dict[Deadline, None] = {}
        self.timer: asyncio.TimerHandle | None = None

    def add(self, deadline: Deadline) -> None:
        self.deadlines[deadline] = None
        if self.timer is None:
            self._set(deadline.when)

    def _set(self, when: float) -> None:
        self.timer = self.loop.call_later(max(0.0, when - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self.timer = None
        now = time.monotonic()
        deadlines = self.deadlines
        while deadlines:
            first = next(iter(deadlines))
            if first.when > now:
                self._set(first.when)
                return
            del deadlines[first]
            first.fire()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.deadlines.clear()


class Deadlines:
    """Function timeouts at the cost of a dict entry a call: one loop timer per timeout length,
    set again only when its earliest deadline has passed. (`asyncio.timeout` schedules and
    cancels a timer for every call, and uvloop makes each timer a libuv handle, closed on a
    later turn of the loop.) A finished call leaves its lane at once; the timer may then fire
    early for nothing and is set for the next deadline."""

    def __init__(self) -> None:
        self._lanes: dict[float, _Lane] = {}

    def start(self, seconds: float, task: asyncio.Task[Any], began: float) -> Deadline:
        """The deadline of a call that began at `began` (time.monotonic). Calls begin in the
        order they are started in (one thread), so each lane stays in deadline order."""
        loop = task.get_loop()
        lane = self._lanes.get(seconds)
        if lane is None or lane.loop is not loop:
            lane = self._lanes[seconds] = _Lane(loop)
        deadline = Deadline(began + seconds, task)
        lane.add(deadline)
        return deadline

    def end(self, seconds: float, deadline: Deadline) -> None:
        lane = self._lanes.get(seconds)
        if lane is not None:
            lane.deadlines.pop(deadline, None)

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.close()
        self._lanes.clear()


@types.coroutine
def _rest_of(call: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """The rest of `call`, whose first step ran already and yielded `waiting_on`: goes on as
    `await call` would have (what the task sends or throws in is passed through)."""
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            call.close()
            raise
        except BaseException as exc:
            try:
                waiting_on = call.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting_on = call.send(sent)
            except StopIteration as done:
                return done.value


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _output_began(ctx: TaskContext) -> bool:
    # A stream whose output reached its client cannot be retried without repeating it.
    return ctx.stream is not None and ctx.stream.began


class Runner(Part):
    """Calls functions: coroutines on the loop, plain `def`s in threads, generators drained."""

    name = "thread pool"

    def __init__(self, default_timeout: float) -> None:
        self.default_timeout = default_timeout
        # Concurrency is already bounded by the slots; the pool only has to never be the limit.
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=1024, thread_name_prefix="function"
        )
        self._deadlines = Deadlines()

    def apply(self, new: Config) -> None:
        self.default_timeout = new.worker.default_timeout

    async def stop(self, deadline: float) -> None:
        # A thread cannot be killed: what still runs was accounted for by the drain.
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._deadlines.close()

    async def run(self, spec: FunctionSpec, params: dict[str, Any], ctx: TaskContext) -> RunResult:
        """Call `spec` up to 1 + max_retries times while it raises; never raises itself
        except CancelledError, which the caller turns into a cancelled outcome."""
        timeout = spec.timeout if spec.timeout is not None else self.default_timeout
        attempt = 0
        while True:
            attempt += 1
            result = await self._attempt(spec, params, ctx, timeout)
            if result.outcome is not FAILED or attempt > spec.max_retries or _output_began(ctx):
                if attempt == 1:  # attempts is 1 already: no copy of the result
                    return result
                return RunResult(
                    result.outcome,
                    result.value,
                    result.error,
                    attempt,
                    result.overrun,
                    result.reason,
                    result.failure,
                )
            ctx.log.warning("attempt failed, retrying", attempt=attempt, error=result.error)

    async def _attempt(
        self, spec: FunctionSpec, params: dict[str, Any], ctx: TaskContext, seconds: float
    ) -> RunResult:
        thread: concurrent.futures.Future[Any] | None = None
        began = time.monotonic()
        call: Coroutine[Any, Any, Any] | None = None
        if spec.kind == "async":
            # Its first step runs here, before any timer: a call that ends without awaiting
            # anything (many do little) needs no deadline, and one that waits gets its
            # deadline counted from `began`, as a timer set before the call would be.
            try:
                call = spec.handler(params, ctx)
                waiting_on = call.send(None)
            except StopIteration as done:
                return RunResult(SUCCEEDED, done.value)  # positional: half the cost
            except Exception as exc:
                return RunResult(FAILED, error=_error_text(exc), failure=exc)
        task = asyncio.current_task()  # asked only now: on 3.11 it costs a getpid() call
        assert task is not None
        deadline = self._deadlines.start(seconds, task, began)
        try:
            if call is not None:
                value = await _rest_of(call, waiting_on)
            elif spec.kind == "thread":
                run_in_context = contextvars.copy_context().run
                thread = self._threads.submit(run_in_context, spec.handler, params, ctx)
                value = await asyncio.wrap_future(thread)
            else:
                value = await self._drain_generator(spec, params, ctx)
        except asyncio.CancelledError:
            if not deadline.expired():
                raise
            overrun = thread if thread is not None and not thread.done() else None
            return RunResult(
                TIMED_OUT,
                error=f"Function timed out after {seconds:g}s",
                overrun=overrun,
                reason=Reason.TIMEOUT,
            )
        except Exception as exc:
            return RunResult(FAILED, error=_error_text(exc), failure=exc)
        finally:
            self._deadlines.end(seconds, deadline)
            deadline.settle()
        return RunResult(SUCCEEDED, value)

    @staticmethod
    async def _drain_generator(spec: FunctionSpec, params: dict[str, Any], ctx: TaskContext) -> Any:
        chunks: list[Any] = []
        generator = spec.handler(params, ctx)
        stream = ctx.stream
        try:
            if stream is not None:
                await stream.send_each(generator)
                return None
            async for chunk in generator:
                chunks.append(chunk)
        finally:
            await generator.aclose()
        if chunks and all(isinstance(chunk, str) for chunk in chunks):
            return "".join(chunks)
        return chunks
