"""Running one function call (worker/runner.py): the three forms, the timeout, the retries, and
a cancel from outside."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from tests.conftest import make_config
from worker.context import Mode, TaskContext
from worker.functions import FunctionSpec, Kind
from worker.outcomes import Outcome, Reason
from worker.params import compile_params
from worker.runner import Runner

CALLER = contextvars.ContextVar("CALLER", default="unset")


def spec(
    handler: Callable[..., Any],
    kind: Kind,
    *,
    timeout: float | None = None,
    max_retries: int = 0,
) -> FunctionSpec:
    return FunctionSpec(
        name=handler.__name__,
        handler=handler,
        kind=kind,
        params={},
        schema=compile_params(handler.__name__, {}),
        timeout=timeout,
        max_retries=max_retries,
    )


def context(stream: Any = None, mode: Mode = "sync") -> TaskContext:
    log = structlog.get_logger("tests.runner").bind(task_id="t-1")
    return TaskContext("t-1", "f", 1, mode, stream, log)


class Stream:
    """A StreamWriter that keeps its chunks; output has begun once a chunk was written."""

    def __init__(self) -> None:
        self.chunks: list[Any] = []

    async def __call__(self, chunk: Any) -> None:
        self.chunks.append(chunk)

    async def send_each(self, chunks: AsyncIterator[Any]) -> None:
        async for chunk in chunks:
            await self(chunk)

    @property
    def began(self) -> bool:
        return bool(self.chunks)


@pytest.fixture
async def runner() -> AsyncIterator[Runner]:
    made = Runner(default_timeout=30.0)
    yield made
    await made.stop(asyncio.get_running_loop().time())


# --- the three forms -----------------------------------------------------------------------------


async def test_an_async_def_runs_on_the_event_loop(runner: Runner) -> None:
    async def on_loop(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        return {"thread": threading.current_thread().name, "got": params, "task": ctx.task_id}

    result = await runner.run(spec(on_loop, "async"), {"n": 1}, context())
    assert (result.outcome, result.attempts, result.error) == (Outcome.SUCCEEDED, 1, None)
    assert result.value == {
        "thread": threading.current_thread().name,
        "got": {"n": 1},
        "task": "t-1",
    }
    assert (result.overrun, result.reason) == (None, None)


async def test_a_plain_def_runs_in_a_pool_thread_with_the_callers_context(runner: Runner) -> None:
    def in_thread(params: dict[str, Any], ctx: TaskContext) -> tuple[str, str, str]:
        return threading.current_thread().name, CALLER.get(), ctx.task_id

    CALLER.set("the request")
    result = await runner.run(spec(in_thread, "thread"), {}, context())
    assert result.outcome is Outcome.SUCCEEDED
    name, caller, task_id = result.value
    assert name.startswith("function") and name != threading.current_thread().name
    assert (caller, task_id) == ("the request", "t-1")


async def test_a_generator_of_strings_is_joined(runner: Runner) -> None:
    async def words(params: dict[str, Any], ctx: TaskContext) -> AsyncIterator[str]:
        for word in ("one ", "two ", "three"):
            yield word

    result = await runner.run(spec(words, "generator"), {}, context())
    assert (result.outcome, result.value) == (Outcome.SUCCEEDED, "one two three")


async def test_a_generator_of_other_values_is_a_list(runner: Runner) -> None:
    async def mixed(params: dict[str, Any], ctx: TaskContext) -> AsyncIterator[Any]:
        yield 1
        yield "two"
        yield {"three": 3}

    result = await runner.run(spec(mixed, "generator"), {}, context())
    assert (result.outcome, result.value) == (Outcome.SUCCEEDED, [1, "two", {"three": 3}])


async def test_an_empty_generator_is_an_empty_list(runner: Runner) -> None:
    async def nothing(params: dict[str, Any], ctx: TaskContext) -> AsyncIterator[Any]:
        return
        yield  # pragma: no cover

    result = await runner.run(spec(nothing, "generator"), {}, context())
    assert (result.outcome, result.value) == (Outcome.SUCCEEDED, [])


async def test_a_generator_in_mode_stream_writes_each_chunk_to_the_stream(runner: Runner) -> None:
    stream = Stream()

    async def chunks(params: dict[str, Any], ctx: TaskContext) -> AsyncIterator[Any]:
        yield "a"
        assert stream.chunks == ["a"]  # written before the next one is asked for
        yield {"b": 2}

    result = await runner.run(spec(chunks, "generator"), {}, context(stream, "stream"))
    assert (result.outcome, result.value) == (Outcome.SUCCEEDED, None)
    assert stream.chunks == ["a", {"b": 2}]


async def test_a_failing_generator_is_closed_and_fails(runner: Runner) -> None:
    closed: list[bool] = []

    async def breaks(params: dict[str, Any], ctx: TaskContext) -> AsyncIterator[str]:
        try:
            yield "partial"
            raise RuntimeError("broke halfway")
        finally:
            closed.append(True)

    result = await runner.run(spec(breaks, "generator"), {}, context())
    assert (result.outcome, result.error, result.value) == (Outcome.FAILED, "broke halfway", None)
    assert closed == [True]


async def test_an_exception_without_a_message_is_named_by_its_type(runner: Runner) -> None:
    async def bare(params: dict[str, Any], ctx: TaskContext) -> None:
        raise KeyError

    result = await runner.run(spec(bare, "async"), {}, context())
    assert (result.outcome, result.error, result.reason) == (Outcome.FAILED, "KeyError", None)


# --- the timeout ---------------------------------------------------------------------------------


async def test_an_async_def_over_its_timeout_is_cancelled_and_timed_out(runner: Runner) -> None:
    cancelled = asyncio.Event()

    async def forever(params: dict[str, Any], ctx: TaskContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    result = await runner.run(spec(forever, "async", timeout=0.05), {}, context())
    assert result.outcome is Outcome.TIMED_OUT
    assert result.reason is Reason.TIMEOUT
    assert result.error == "Function timed out after 0.05s"
    assert result.overrun is None  # nothing keeps running
    assert cancelled.is_set()


async def test_a_blocking_thread_over_its_timeout_is_handed_back_as_an_overrun(
    runner: Runner,
) -> None:
    release = threading.Event()

    def blocks(params: dict[str, Any], ctx: TaskContext) -> str:
        release.wait(30)
        return "finished late"

    result = await runner.run(spec(blocks, "thread", timeout=0.05), {}, context())
    assert (result.outcome, result.reason) == (Outcome.TIMED_OUT, Reason.TIMEOUT)
    overrun = result.overrun
    assert overrun is not None
    assert not overrun.done()  # a thread cannot be killed: it is still running
    release.set()
    assert await asyncio.wait_for(asyncio.wrap_future(overrun), 5) == "finished late"


async def test_a_thread_that_returns_in_time_leaves_no_overrun(runner: Runner) -> None:
    def quick(params: dict[str, Any], ctx: TaskContext) -> int:
        return 7

    result = await runner.run(spec(quick, "thread", timeout=30), {}, context())
    assert (result.outcome, result.value, result.overrun) == (Outcome.SUCCEEDED, 7, None)


async def test_the_default_timeout_applies_and_follows_a_reload(runner: Runner) -> None:
    async def forever(params: dict[str, Any], ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    runner.apply(make_config(worker={"default_timeout": 0.05}))
    result = await runner.run(spec(forever, "async"), {}, context())
    assert (result.outcome, result.error) == (Outcome.TIMED_OUT, "Function timed out after 0.05s")
    # The function's own timeout wins over the default.
    own = await runner.run(spec(forever, "async", timeout=0.06), {}, context())
    assert own.error == "Function timed out after 0.06s"


async def test_a_timeout_is_not_retried(runner: Runner) -> None:
    calls: list[int] = []

    async def slow(params: dict[str, Any], ctx: TaskContext) -> None:
        calls.append(1)
        await asyncio.Event().wait()

    result = await runner.run(spec(slow, "async", timeout=0.05, max_retries=3), {}, context())
    assert (result.outcome, result.attempts, len(calls)) == (Outcome.TIMED_OUT, 1, 1)


# --- retries -------------------------------------------------------------------------------------


def failing(times: int) -> tuple[Callable[..., Any], list[int]]:
    """An async function that raises on its first `times` calls, then returns its call count."""
    calls: list[int] = []

    async def flaky(params: dict[str, Any], ctx: TaskContext) -> int:
        calls.append(len(calls) + 1)
        if len(calls) <= times:
            raise RuntimeError(f"attempt {len(calls)} failed")
        return len(calls)

    return flaky, calls


async def test_a_raising_function_is_retried_until_it_succeeds(runner: Runner) -> None:
    flaky, calls = failing(2)
    with capture_logs() as logged:
        result = await runner.run(spec(flaky, "async", max_retries=2), {}, context())
    assert (result.outcome, result.value, result.attempts) == (Outcome.SUCCEEDED, 3, 3)
    assert calls == [1, 2, 3]
    retried = [e for e in logged if e["event"] == "attempt failed, retrying"]
    assert [(e["attempt"], e["error"], e["log_level"]) for e in retried] == [
        (1, "attempt 1 failed", "warning"),
        (2, "attempt 2 failed", "warning"),
    ]


async def test_retries_stop_at_max_retries_with_the_last_error(runner: Runner) -> None:
    flaky, calls = failing(10)
    result = await runner.run(spec(flaky, "async", max_retries=2), {}, context())
    assert (result.outcome, result.attempts, result.error) == (
        Outcome.FAILED,
        3,
        "attempt 3 failed",
    )
    assert calls == [1, 2, 3]


async def test_without_max_retries_a_failure_is_final(runner: Runner) -> None:
    flaky, calls = failing(1)
    result = await runner.run(spec(flaky, "async"), {}, context())
    assert (result.outcome, result.attempts, calls) == (Outcome.FAILED, 1, [1])


async def test_a_plain_def_is_retried_too(runner: Runner) -> None:
    calls: list[int] = []

    def flaky(params: dict[str, Any], ctx: TaskContext) -> int:
        calls.append(1)
        if len(calls) < 2:
            raise ValueError("first call fails")
        return len(calls)

    result = await runner.run(spec(flaky, "thread", max_retries=1), {}, context())
    assert (result.outcome, result.value, result.attempts) == (Outcome.SUCCEEDED, 2, 2)


async def test_no_retry_once_stream_output_began(runner: Runner) -> None:
    stream = Stream()
    calls: list[int] = []

    async def writes_then_fails(params: dict[str, Any], ctx: TaskContext) -> None:
        calls.append(1)
        assert ctx.stream is not None
        await ctx.stream(f"attempt {len(calls)}\n")
        raise RuntimeError("failed after output began")

    fn = spec(writes_then_fails, "async", max_retries=3)
    result = await runner.run(fn, {}, context(stream, "stream"))
    assert (result.outcome, result.attempts, result.error) == (
        Outcome.FAILED,
        1,
        "failed after output began",
    )
    assert stream.chunks == ["attempt 1\n"]


async def test_a_stream_that_failed_before_any_output_is_retried(runner: Runner) -> None:
    stream = Stream()
    calls: list[int] = []

    async def fails_first(params: dict[str, Any], ctx: TaskContext) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("failed before any output")
        assert ctx.stream is not None
        await ctx.stream("ok")

    fn = spec(fails_first, "async", max_retries=1)
    result = await runner.run(fn, {}, context(stream, "stream"))
    assert (result.outcome, result.attempts, stream.chunks) == (Outcome.SUCCEEDED, 2, ["ok"])


# --- a cancel from outside -----------------------------------------------------------------------


async def test_a_cancel_propagates_with_its_reason_and_is_not_retried(runner: Runner) -> None:
    started = asyncio.Event()
    calls: list[int] = []

    async def waits(params: dict[str, Any], ctx: TaskContext) -> None:
        calls.append(1)
        started.set()
        await asyncio.Event().wait()

    call = asyncio.create_task(runner.run(spec(waits, "async", max_retries=3), {}, context()))
    await started.wait()
    call.cancel(Reason.SHUTDOWN)
    with pytest.raises(asyncio.CancelledError) as caught:
        await call
    assert caught.value.args == (Reason.SHUTDOWN,)
    assert calls == [1]


async def test_a_cancel_while_a_thread_runs_propagates_too(runner: Runner) -> None:
    started = threading.Event()
    release = threading.Event()

    def blocks(params: dict[str, Any], ctx: TaskContext) -> None:
        started.set()
        release.wait(30)

    call = asyncio.create_task(runner.run(spec(blocks, "thread"), {}, context()))
    await asyncio.to_thread(started.wait, 5)
    call.cancel(Reason.CLIENT_GONE_STREAMING)
    try:
        with pytest.raises(asyncio.CancelledError):
            await call
    finally:
        release.set()


# --- an async def's first step runs before any timer ---------------------------------------------


async def test_an_async_def_that_waits_goes_on_as_an_awaited_coroutine_would(
    runner: Runner,
) -> None:
    order: list[str] = []

    async def waits(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        order.append("first step")
        await asyncio.sleep(0)  # a bare yield to the loop
        order.append("after a bare yield")
        got = await asyncio.get_running_loop().run_in_executor(None, lambda: 7)
        order.append("after a future")
        return {"got": got, "task": asyncio.current_task() is me}

    me = asyncio.current_task()
    result = await runner.run(spec(waits, "async"), {}, context())
    assert (result.outcome, result.value) == (Outcome.SUCCEEDED, {"got": 7, "task": True})
    assert order == ["first step", "after a bare yield", "after a future"]


async def test_an_async_def_may_time_itself_and_group_tasks_after_its_first_step(
    runner: Runner,
) -> None:
    # asyncio.timeout and TaskGroup act on the current task: it must be the caller's throughout.
    async def careful(params: dict[str, Any], ctx: TaskContext) -> list[str]:
        seen = []
        await asyncio.sleep(0)
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(10)
        except TimeoutError:
            seen.append("own timeout")
        async with asyncio.TaskGroup() as group:
            child = group.create_task(asyncio.sleep(0, result="child"))
        seen.append(child.result())
        return seen

    result = await runner.run(spec(careful, "async", timeout=5), {}, context())
    assert (result.outcome, result.value) == (Outcome.SUCCEEDED, ["own timeout", "child"])
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_failure_after_the_first_step_fails_the_call_with_its_error(
    runner: Runner,
) -> None:
    async def breaks_later(params: dict[str, Any], ctx: TaskContext) -> None:
        await asyncio.sleep(0.01)
        raise ValueError("broke after waiting")

    result = await runner.run(spec(breaks_later, "async"), {}, context())
    assert (result.outcome, result.error) == (Outcome.FAILED, "broke after waiting")
    assert isinstance(result.failure, ValueError)


async def test_a_call_that_swallows_its_timeout_leaves_no_cancel_behind(runner: Runner) -> None:
    async def stubborn(params: dict[str, Any], ctx: TaskContext) -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "kept going"
        return "slept"

    result = await runner.run(spec(stubborn, "async", timeout=0.3), {}, context())
    assert (result.outcome, result.value) == (Outcome.SUCCEEDED, "kept going")
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0)  # and the caller's next await is not cancelled


async def test_the_deadline_counts_from_the_call_not_from_its_first_wait(runner: Runner) -> None:
    blocked_for = 0.4

    async def slow_start(params: dict[str, Any], ctx: TaskContext) -> str:
        threading.Event().wait(blocked_for)  # a first step that keeps the loop busy
        await asyncio.sleep(blocked_for)
        return "in time"

    result = await runner.run(spec(slow_start, "async", timeout=0.6), {}, context())
    assert result.outcome is Outcome.TIMED_OUT  # 0.4 + 0.4 s: over 0.6 s from the call
