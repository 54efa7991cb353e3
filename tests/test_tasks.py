"""Accepted tasks (worker/tasks.py): a Dispatcher owns each Job from its queue place to its
counted, logged outcome, whatever its client does meanwhile."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.conftest import wait_for
from worker import logs
from worker.context import TaskContext
from worker.errors import Unavailable
from worker.functions import FunctionSpec, Kind
from worker.outcomes import Outcome, Reason, verdict
from worker.params import compile_params
from worker.runner import Runner
from worker.slots import SlotManager, SlotState
from worker.tasks import Dispatcher, TaskResult, TaskSpec, milliseconds


def function(
    name: str, handler: Callable[..., Any], kind: Kind = "async", timeout: float | None = None
) -> FunctionSpec:
    return FunctionSpec(name, handler, kind, {}, compile_params(name, {}), timeout=timeout)


class Gate:
    """An async function that says when it started and returns once the test opens it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.open = asyncio.Event()
        self.ran = False

    async def __call__(self, params: dict[str, Any], ctx: TaskContext) -> str:
        self.ran = True
        self.started.set()
        await self.open.wait()
        return "through"


async def succeeds(params: dict[str, Any], ctx: TaskContext) -> str:
    return "ok"


async def fails(params: dict[str, Any], ctx: TaskContext) -> None:
    raise RuntimeError("went wrong")


async def hangs(params: dict[str, Any], ctx: TaskContext) -> None:
    await asyncio.Event().wait()


def task(fn: FunctionSpec, task_id: str = "t", priority: int = 1) -> TaskSpec:
    return TaskSpec(task_id, fn, {}, priority=priority)


def gated(gate: Gate, task_id: str) -> TaskSpec:
    return task(function("gate", gate), task_id)


async def suspended(task: asyncio.Task[Any]) -> None:
    """Wait until `task` has run up to its first await (so it is really waiting, not unstarted)."""
    await wait_for(lambda: inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_SUSPENDED)


def summaries(logged: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The one summary line of each task, by task id (a second line for a task fails here)."""
    lines: dict[str, dict[str, Any]] = {}
    for entry in logged:
        if entry["event"] == "task":
            assert entry["task_id"] not in lines, entry
            lines[entry["task_id"]] = entry
    return lines


def level_of(outcome: Outcome, reason: Reason | None) -> str:
    return logging.getLevelName(verdict(outcome, reason).level).lower()


@pytest.fixture(autouse=True)
def info_level() -> Iterator[None]:
    """Summary lines are info or warning: let them through whatever level another test left."""
    saved = {k: v for k, v in vars(logs.WorkerLogger).items() if not k.startswith("__")}
    logs.set_level(logging.INFO)
    yield
    for name in [k for k in vars(logs.WorkerLogger) if not k.startswith("__")]:
        delattr(logs.WorkerLogger, name)
    for name, attr in saved.items():
        setattr(logs.WorkerLogger, name, attr)


@pytest.fixture
async def runner() -> AsyncIterator[Runner]:
    made = Runner(default_timeout=30.0)
    yield made
    await made.stop(asyncio.get_running_loop().time())


@pytest.fixture
def dispatcher(runner: Runner) -> Dispatcher:
    return Dispatcher(SlotManager(limit=1, max_queue=10), runner)


# --- outcomes, counted and logged once -----------------------------------------------------------


async def test_each_outcome_is_counted(runner: Runner) -> None:
    dispatcher = Dispatcher(SlotManager(limit=4, max_queue=10), runner)
    ok, bad = function("succeeds", succeeds), function("fails", fails)
    slow = function("hangs", hangs, timeout=0.05)
    jobs = [dispatcher.submit(task(fn, f"t{i}")) for i, fn in enumerate([ok, ok, bad, slow])]
    assert dispatcher.in_flight == 4
    results = [await job.result() for job in jobs]
    assert [r.outcome for r in results] == [
        Outcome.SUCCEEDED,
        Outcome.SUCCEEDED,
        Outcome.FAILED,
        Outcome.TIMED_OUT,
    ]
    assert [r.value for r in results[:2]] == ["ok", "ok"]
    assert (results[2].error, results[3].reason) == ("went wrong", Reason.TIMEOUT)
    assert dispatcher.counts == {Outcome.SUCCEEDED: 2, Outcome.FAILED: 1, Outcome.TIMED_OUT: 1}
    await wait_for(lambda: dispatcher.in_flight == 0)
    assert dispatcher.slots.state() == SlotState("ready", 0, 4, 0)


@pytest.mark.parametrize(
    ("handler", "timeout", "outcome", "reason"),
    [
        (succeeds, None, Outcome.SUCCEEDED, None),
        (fails, None, Outcome.FAILED, None),
        (hangs, 0.05, Outcome.TIMED_OUT, Reason.TIMEOUT),
    ],
    ids=["succeeded", "failed", "timed out"],
)
async def test_one_summary_line_at_the_level_of_the_verdict_and_the_slot_given_back(
    dispatcher: Dispatcher,
    handler: Callable[..., Any],
    timeout: float | None,
    outcome: Outcome,
    reason: Reason | None,
) -> None:
    with capture_logs() as logged:
        job = dispatcher.submit(task(function("f", handler, timeout=timeout), "t-sum", 3))
        result = await job.result()
    assert (result.outcome, result.reason) == (outcome, reason)
    line = summaries(logged)["t-sum"]
    assert line["log_level"] == level_of(outcome, reason)
    assert (line["outcome"], line["function"], line["priority"], line["mode"]) == (
        outcome.value,
        "f",
        3,
        "sync",
    )
    assert line["queue_wait_ms"] >= 0 and line["run_time_ms"] >= 0
    assert ("error" in line) is (outcome is not Outcome.SUCCEEDED)
    assert dispatcher.slots.state() == SlotState("ready", 0, 1, 0)


async def test_the_summary_line_counts_attempts_when_there_were_retries(
    dispatcher: Dispatcher,
) -> None:
    calls: list[int] = []

    async def flaky(params: dict[str, Any], ctx: TaskContext) -> int:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("not yet")
        return len(calls)

    fn = FunctionSpec("flaky", flaky, "async", {}, compile_params("flaky", {}), max_retries=2)
    with capture_logs() as logged:
        result = await dispatcher.submit(task(fn, "t-retry")).result()
    assert (result.outcome, result.value) == (Outcome.SUCCEEDED, 3)
    assert summaries(logged)["t-retry"]["attempts"] == 3


# --- a client that goes ---------------------------------------------------------------------------


async def test_a_queued_job_holds_no_asyncio_task_until_it_has_a_slot(
    dispatcher: Dispatcher,
) -> None:
    holder = Gate()
    dispatcher.submit(gated(holder, "holder"))
    await holder.started.wait()
    before = len(asyncio.all_tasks())
    gates = [Gate() for _ in range(10)]
    queued = [dispatcher.submit(gated(gate, f"q{n}")) for n, gate in enumerate(gates)]
    assert dispatcher.slots.state().queue == 10
    assert len(asyncio.all_tasks()) == before  # 10,000 queued tasks hold no coroutine
    holder.open.set()
    await gates[0].started.wait()
    assert queued[0].task is not None and all(job.task is None for job in queued[1:])
    for gate in gates:
        gate.open.set()
    results = [await job.result() for job in queued]
    assert [r.outcome for r in results] == [Outcome.SUCCEEDED] * 10
    assert dispatcher.slots.state() == SlotState("ready", 0, 1, 0)


async def test_queued_jobs_start_when_the_slots_grow(dispatcher: Dispatcher) -> None:
    holder = Gate()
    held = dispatcher.submit(gated(holder, "holder"))
    await holder.started.wait()
    gates = [Gate() for _ in range(3)]
    queued = [dispatcher.submit(gated(gate, f"q{n}")) for n, gate in enumerate(gates)]
    dispatcher.slots.resize(4)  # a reload: every queued job gets a slot, and its task
    for gate in gates:
        await asyncio.wait_for(gate.started.wait(), 5)
    assert dispatcher.slots.state() == SlotState("ready", 4, 4, 0)
    for gate in [holder, *gates]:
        gate.open.set()
    results = [await job.result() for job in [held, *queued]]
    assert [r.outcome for r in results] == [Outcome.SUCCEEDED] * 4
    assert dispatcher.slots.state() == SlotState("ready", 0, 4, 0)


async def test_a_queued_job_abandoned_by_its_client_leaves_the_queue_and_takes_no_slot(
    dispatcher: Dispatcher,
) -> None:
    holder, waiter = Gate(), Gate()
    held = dispatcher.submit(gated(holder, "holder"))
    await holder.started.wait()
    queued = dispatcher.submit(gated(waiter, "queued"))
    assert queued.task is None  # a queued job has no task until it has a slot
    assert dispatcher.slots.state().queue == 1
    with capture_logs() as logged:
        client = asyncio.create_task(queued.result())
        await suspended(client)
        client.cancel()
        with pytest.raises(asyncio.CancelledError):
            await client
        result = queued.finished()
    assert (result.outcome, result.reason) == (Outcome.CANCELLED, Reason.CLIENT_GONE_QUEUED)
    assert (result.error, result.run_time) == (Reason.CLIENT_GONE_QUEUED.value, 0.0)
    assert dispatcher.slots.state() == SlotState("ready", 1, 1, 0)  # only the holder's
    line = summaries(logged)["queued"]
    assert line["log_level"] == level_of(Outcome.CANCELLED, Reason.CLIENT_GONE_QUEUED)
    holder.open.set()
    assert (await held.result()).outcome is Outcome.SUCCEEDED
    assert not waiter.ran
    assert dispatcher.counts == {Outcome.CANCELLED: 1, Outcome.SUCCEEDED: 1}
    assert dispatcher.slots.state() == SlotState("ready", 0, 1, 0)


@pytest.mark.parametrize("behind_a_holder", [True, False], ids=["queued", "granted a slot"])
async def test_a_job_abandoned_before_its_first_step_gives_back_its_place(
    runner: Runner, behind_a_holder: bool
) -> None:
    dispatcher = Dispatcher(SlotManager(limit=1, max_queue=10), runner)
    holder = Gate()
    if behind_a_holder:
        dispatcher.submit(gated(holder, "holder"))
        await holder.started.wait()
    before = dispatcher.slots.state()
    waiter = Gate()
    with capture_logs() as logged:
        job = dispatcher.submit(gated(waiter, "early"))
        assert dispatcher.slots.state() != before  # it holds a queue place or a slot
        job.abandon()  # before the job's task ever ran
        await wait_for(lambda: "early" in summaries(logged))
    assert job.task is None if behind_a_holder else job.task.cancelled()
    assert job.finished().outcome is Outcome.CANCELLED
    assert dispatcher.slots.state() == before
    line = summaries(logged)["early"]
    assert line["log_level"] == level_of(Outcome.CANCELLED, Reason.CLIENT_GONE_QUEUED)
    assert line["error"] == Reason.CLIENT_GONE_QUEUED.value
    assert line["run_time_ms"] == 0
    assert dispatcher.counts == {Outcome.CANCELLED: 1}
    assert not waiter.ran
    holder.open.set()
    await dispatcher.wait_done()
    assert dispatcher.slots.state() == SlotState("ready", 0, 1, 0)


async def test_the_reason_of_a_job_abandoned_before_its_first_step_survives_the_summary(
    dispatcher: Dispatcher,
) -> None:
    job = dispatcher.submit(gated(Gate(), "early"))
    job.abandon()
    await dispatcher.wait_done()  # the summary line has been written
    result = job.finished()
    assert (result.outcome, result.reason) == (Outcome.CANCELLED, Reason.CLIENT_GONE_QUEUED)


async def test_a_job_cancelled_before_its_first_step_logs_the_reason_its_client_gets(
    dispatcher: Dispatcher,
) -> None:
    with capture_logs() as logged:
        job = dispatcher.submit(gated(Gate(), "early"))
        client = asyncio.create_task(job.result())
        dispatcher.cancel_all(Reason.CLIENT_GONE_STREAMING)  # before either task's first step
        result = await client
        await dispatcher.wait_done()
    assert result.reason is Reason.CLIENT_GONE_STREAMING
    line = summaries(logged)["early"]
    assert line["error"] == Reason.CLIENT_GONE_STREAMING.value
    assert line["log_level"] == level_of(Outcome.CANCELLED, Reason.CLIENT_GONE_STREAMING)


async def test_a_running_job_whose_client_is_cancelled_runs_to_completion(
    dispatcher: Dispatcher,
) -> None:
    gate = Gate()
    job = dispatcher.submit(gated(gate, "running"))
    await gate.started.wait()
    client = asyncio.create_task(job.result())
    await suspended(client)
    client.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client
    assert not job.task.done()
    gate.open.set()
    result = await job.task
    assert (result.outcome, result.value) == (Outcome.SUCCEEDED, "through")
    assert dispatcher.counts == {Outcome.SUCCEEDED: 1}
    assert dispatcher.slots.state() == SlotState("ready", 0, 1, 0)


# --- shutdown ------------------------------------------------------------------------------------


async def test_cancel_all_cancels_running_and_queued_jobs_for_the_shutdown(
    dispatcher: Dispatcher,
) -> None:
    running, waiting = Gate(), Gate()
    first = dispatcher.submit(gated(running, "running"))
    await running.started.wait()
    second = dispatcher.submit(gated(waiting, "queued"))
    clients = [asyncio.create_task(job.result()) for job in (first, second)]
    with capture_logs() as logged:
        assert dispatcher.cancel_all() == 2
        results: list[TaskResult] = await asyncio.gather(*clients)  # clients still get answers
        await dispatcher.wait_done()
    shutdown = (Outcome.CANCELLED, Reason.SHUTDOWN, Reason.SHUTDOWN.value)
    assert [(r.outcome, r.reason, r.error) for r in results] == [shutdown, shutdown]
    assert dispatcher.counts == {Outcome.CANCELLED: 2}
    assert not waiting.ran
    lines = summaries(logged)
    assert set(lines) == {"running", "queued"}
    assert {line["log_level"] for line in lines.values()} == {
        level_of(Outcome.CANCELLED, Reason.SHUTDOWN)
    }
    assert dispatcher.in_flight == 0
    assert dispatcher.slots.state() == SlotState("ready", 0, 1, 0)


async def test_cancel_all_passes_on_the_reason_it_is_given(dispatcher: Dispatcher) -> None:
    gate = Gate()
    job = dispatcher.submit(gated(gate, "streamed"))
    await gate.started.wait()
    dispatcher.cancel_all(Reason.CLIENT_GONE_STREAMING)
    result = await job.result()
    assert (result.outcome, result.reason) == (Outcome.CANCELLED, Reason.CLIENT_GONE_STREAMING)


async def test_wait_done_returns_once_every_job_has_an_outcome(dispatcher: Dispatcher) -> None:
    await asyncio.wait_for(dispatcher.wait_done(), 5)  # nothing accepted: done at once
    gate = Gate()
    dispatcher.submit(gated(gate, "one"))
    done = asyncio.create_task(dispatcher.wait_done())
    await gate.started.wait()
    await suspended(done)
    assert not done.done()
    gate.open.set()
    await asyncio.wait_for(done, 5)
    assert dispatcher.in_flight == 0


# --- slots ---------------------------------------------------------------------------------------


async def test_a_refused_task_is_never_tracked(dispatcher: Dispatcher) -> None:
    dispatcher.slots.hold("maintenance")
    with pytest.raises(Unavailable):
        dispatcher.submit(task(function("succeeds", succeeds)))
    assert dispatcher.in_flight == 0
    assert sum(dispatcher.counts.values()) == 0


async def test_a_thread_over_its_timeout_keeps_its_slot_until_it_returns(
    dispatcher: Dispatcher,
) -> None:
    release = threading.Event()

    def blocks(params: dict[str, Any], ctx: TaskContext) -> str:
        release.wait(30)
        return "late"

    fn = function("blocks", blocks, kind="thread", timeout=0.05)
    result = await dispatcher.submit(task(fn, "overrun")).result()
    assert (result.outcome, result.reason) == (Outcome.TIMED_OUT, Reason.TIMEOUT)
    assert dispatcher.slots.state().used == 1  # the thread still runs
    queued = dispatcher.submit(task(function("succeeds", succeeds), "next"))
    assert dispatcher.slots.state().queue == 1
    release.set()
    assert (await queued.result()).outcome is Outcome.SUCCEEDED
    await wait_for(lambda: dispatcher.slots.state() == SlotState("ready", 0, 1, 0))


async def test_queued_jobs_take_the_slot_by_priority(dispatcher: Dispatcher) -> None:
    holder = Gate()
    dispatcher.submit(gated(holder, "holder"))
    await holder.started.wait()
    order: list[str] = []

    def recording(label: str) -> FunctionSpec:
        async def record(params: dict[str, Any], ctx: TaskContext) -> None:
            order.append(label)

        return function(label, record)

    jobs = [
        dispatcher.submit(task(recording(label), label, priority))
        for label, priority in [("p3", 3), ("p1", 1), ("p2", 2)]
    ]
    holder.open.set()
    await asyncio.gather(*(job.result() for job in jobs))
    assert order == ["p1", "p2", "p3"]


async def test_wait_done_returns_only_when_the_last_job_has_ended_whoever_else_gave_up(
    dispatcher: Dispatcher,
) -> None:
    await dispatcher.wait_done()  # nothing in flight: at once
    first, second = Gate(), Gate()
    dispatcher.submit(gated(first, "first"))
    dispatcher.submit(gated(second, "second"))  # queued behind the first
    await first.started.wait()
    impatient = asyncio.create_task(dispatcher.wait_done())
    patient = asyncio.create_task(dispatcher.wait_done())
    await suspended(impatient)
    await suspended(patient)
    impatient.cancel()  # a drain given up must not end the others' wait
    first.open.set()
    await second.started.wait()
    assert not patient.done()  # one job ended, one still runs
    second.open.set()
    await asyncio.wait_for(patient, 5)
    assert impatient.cancelled()
    assert dispatcher.in_flight == 0


@hypothesis.given(st.floats(min_value=0.0, max_value=1e6, allow_nan=False))
def test_summary_durations_are_rounded_as_round_rounds_them(seconds: float) -> None:
    scaled = seconds * 100_000.0
    near_a_half = abs(scaled - math.floor(scaled) - 0.5) < 1e-6 * max(1.0, scaled)
    if near_a_half:
        assert abs(milliseconds(seconds) - round(seconds * 1000, 2)) <= 0.0100001
    else:
        assert milliseconds(seconds) == round(seconds * 1000, 2)
