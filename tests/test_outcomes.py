"""How a task can end and what each ending means (worker/outcomes.py): the verdict table and
reading a cancel's reason."""

from __future__ import annotations

import asyncio
import logging

import pytest

from worker.outcomes import VERDICTS, Outcome, Reason, reason_of, verdict

# Every (outcome, reason) the code produces, and where.
PRODUCED: list[tuple[Outcome, Reason | None]] = [
    (Outcome.SUCCEEDED, None),  # runner: the function returned
    (Outcome.FAILED, None),  # runner: it raised, retries spent; tasks: a bug's trace
    (Outcome.TIMED_OUT, Reason.TIMEOUT),  # runner: asyncio.timeout ran out
    (Outcome.CANCELLED, Reason.CLIENT_GONE_QUEUED),  # tasks: Job.abandon
    (Outcome.CANCELLED, Reason.CLIENT_GONE_STREAMING),  # streaming: the client hung up
    (Outcome.CANCELLED, Reason.SHUTDOWN),  # tasks: cancel_all, or a cancel with no reason
    (Outcome.CANCELLED, Reason.KEPT),  # webhooks: a drain leaves a journaled task queued
]


@pytest.mark.parametrize(("outcome", "reason"), PRODUCED)
def test_every_ending_the_code_produces_has_a_verdict(
    outcome: Outcome, reason: Reason | None
) -> None:
    found = verdict(outcome, reason)
    assert found is VERDICTS[outcome, reason]
    assert found.label == outcome.value


def test_the_table_holds_nothing_else() -> None:
    assert set(VERDICTS) == set(PRODUCED)


def test_every_outcome_and_every_reason_can_be_produced() -> None:
    assert {outcome for outcome, _ in PRODUCED} == set(Outcome)
    assert {reason for _, reason in PRODUCED} - {None} == set(Reason)


def test_an_ending_outside_the_table_is_a_key_error_not_a_default() -> None:
    with pytest.raises(KeyError):
        verdict(Outcome.SUCCEEDED, Reason.SHUTDOWN)


@pytest.mark.parametrize(
    ("outcome", "reason", "level", "status"),
    [
        (Outcome.SUCCEEDED, None, logging.INFO, 200),
        (Outcome.FAILED, None, logging.WARNING, 500),
        (Outcome.TIMED_OUT, Reason.TIMEOUT, logging.WARNING, 504),
        (Outcome.CANCELLED, Reason.CLIENT_GONE_QUEUED, logging.INFO, 499),
        (Outcome.CANCELLED, Reason.CLIENT_GONE_STREAMING, logging.INFO, 499),
        (Outcome.CANCELLED, Reason.SHUTDOWN, logging.WARNING, 503),
        (Outcome.CANCELLED, Reason.KEPT, logging.INFO, 503),
    ],
)
def test_log_level_and_http_status_of_each_ending(
    outcome: Outcome, reason: Reason | None, level: int, status: int
) -> None:
    assert (verdict(outcome, reason).level, verdict(outcome, reason).status) == (level, status)


def test_a_client_gone_while_queued_or_streaming_is_one_verdict() -> None:
    # A client that leaves is its own business, not the worker's: one level, one status.
    queued = verdict(Outcome.CANCELLED, Reason.CLIENT_GONE_QUEUED)
    streaming = verdict(Outcome.CANCELLED, Reason.CLIENT_GONE_STREAMING)
    assert queued == streaming
    assert queued.level < verdict(Outcome.CANCELLED, Reason.SHUTDOWN).level


@pytest.mark.parametrize("reason", list(Reason))
def test_reason_of_reads_the_reason_a_cancel_carries(reason: Reason) -> None:
    assert reason_of(asyncio.CancelledError(reason)) is reason


@pytest.mark.parametrize(
    "error",
    [
        asyncio.CancelledError(),
        asyncio.CancelledError("a text, not a Reason"),
        asyncio.CancelledError(Reason.CLIENT_GONE_QUEUED.value),
        asyncio.CancelledError(None),
    ],
    ids=["no reason", "other text", "a reason's text", "None"],
)
def test_reason_of_defaults_to_the_shutdown(error: asyncio.CancelledError) -> None:
    assert reason_of(error) is Reason.SHUTDOWN


async def test_a_reason_given_to_task_cancel_reaches_the_cancelled_code() -> None:
    waiting = asyncio.Event()
    seen: list[Reason] = []

    async def victim() -> None:
        waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as exc:
            seen.append(reason_of(exc))
            raise

    task = asyncio.create_task(victim())
    await waiting.wait()
    task.cancel(Reason.CLIENT_GONE_QUEUED)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [Reason.CLIENT_GONE_QUEUED]
