"""How a task can end, why a cancelled one was cancelled, and what each ending means.

One table maps (outcome, reason) to the log level of the task's summary line, the HTTP status a
waiting client gets, and the label counters use. Every mode reads it; nothing compares reason
strings.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    # Members are singletons, equal only to themselves: the identity hash is C's, where Enum's
    # hashes the name in Python (a task's outcome is hashed three times: count, verdict, log).
    __hash__ = object.__hash__


class Reason(enum.Enum):
    """Why a task ended without a result of its own; the value is the text clients and logs get.

    A cancelled task's asyncio task is cancelled with one of these as the message.
    """

    CLIENT_GONE_QUEUED = "client disconnected while queued"
    CLIENT_GONE_STREAMING = "client disconnected from the stream"
    TIMEOUT = "the function ran over its timeout"
    SHUTDOWN = "Task cancelled: the worker is shutting down"
    KEPT = "kept in the task journal for the next start"

    __hash__ = object.__hash__  # as Outcome's


# On Python 3.11 the Enum metaclass has a __getattr__, which makes every `Outcome.SUCCEEDED` a
# slow attribute lookup (about 1,000 instructions, where a module constant costs a few dozen);
# a task's path reads it five or six times. That path reads these.
SUCCEEDED = Outcome.SUCCEEDED
FAILED = Outcome.FAILED
TIMED_OUT = Outcome.TIMED_OUT
CANCELLED = Outcome.CANCELLED


def reason_of(exc: BaseException) -> Reason:
    """The Reason a CancelledError carries; a cancel with no reason is the shutdown's."""
    given = exc.args[0] if exc.args else None
    return given if isinstance(given, Reason) else Reason.SHUTDOWN


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an ending means: log level of the summary line, HTTP status, counter label."""

    level: int
    status: int
    label: str


# 499: nginx's "client closed request"; nobody reads it, but a log of statuses stays truthful.
_CLIENT_GONE = Verdict(logging.INFO, 499, Outcome.CANCELLED.value)
VERDICTS: dict[tuple[Outcome, Reason | None], Verdict] = {
    (Outcome.SUCCEEDED, None): Verdict(logging.INFO, 200, Outcome.SUCCEEDED.value),
    (Outcome.FAILED, None): Verdict(logging.WARNING, 500, Outcome.FAILED.value),
    (Outcome.TIMED_OUT, Reason.TIMEOUT): Verdict(logging.WARNING, 504, Outcome.TIMED_OUT.value),
    (Outcome.CANCELLED, Reason.CLIENT_GONE_QUEUED): _CLIENT_GONE,
    (Outcome.CANCELLED, Reason.CLIENT_GONE_STREAMING): _CLIENT_GONE,
    (Outcome.CANCELLED, Reason.SHUTDOWN): Verdict(logging.WARNING, 503, Outcome.CANCELLED.value),
    (Outcome.CANCELLED, Reason.KEPT): Verdict(logging.INFO, 503, Outcome.CANCELLED.value),
}


def verdict(outcome: Outcome, reason: Reason | None) -> Verdict:
    return VERDICTS[outcome, reason]
