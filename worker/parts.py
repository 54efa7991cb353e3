"""The one shape of a long-lived part of the daemon, and the loops that drive a list of them.

A part starts, stops by a deadline, takes a reloaded config (or refuses it), and adds to the
detailed /health. Which parts exist and in which order is the lifecycle's business alone; the
loops here only keep the rules: start in order, stop in reverse, and a reload is checked by every
part before any part applies it. Two helpers for a part's own waiting: `cancel_and_wait` for its
background task, and `Waiters` for whoever waits on it (a drain).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import structlog

from worker.config import Config

_log = structlog.get_logger("worker.parts")


class ReloadRefused(Exception):
    """A part cannot take a reloaded config live; the message says why."""


class StartFailed(Exception):
    """A part could not start; the parts started before it have been stopped again."""

    def __init__(self, part: str, reason: BaseException) -> None:
        super().__init__(f"{part}: {_describe(reason)}")
        self.part = part


class Part:
    """A long-lived piece of the daemon. Every method has a do-nothing default."""

    name = "part"

    async def start(self) -> None:
        """Set up; an exception stops the whole start-up."""

    async def stop(self, deadline: float) -> None:
        """Let go of everything by `deadline` (event loop time); never raises."""

    def check(self, new: Config) -> None:
        """Raise ReloadRefused when `new` cannot be applied live."""

    def apply(self, new: Config) -> None:
        """Take the reloaded config (every part's `check` has passed)."""

    def health(self) -> dict[str, Any]:
        """Sections of the detailed /health this part contributes."""
        return {}


async def start_all(parts: Sequence[Part]) -> None:
    """Start each part in order; on a failure, stop those already started and raise
    StartFailed, so nothing is left half-started."""
    started: list[Part] = []
    for part in parts:
        try:
            await part.start()
        except Exception as exc:
            await stop_all(started, asyncio.get_running_loop().time())
            raise StartFailed(part.name, exc) from exc
        started.append(part)


async def stop_all(parts: Sequence[Part], deadline: float) -> None:
    """Stop every part in reverse order; one that fails is logged and the others still stop."""
    for part in reversed(parts):
        try:
            await part.stop(deadline)
        except Exception as exc:
            _log.error("part failed to stop", part=part.name, reason=_describe(exc))


def apply_all(parts: Iterable[Part], new: Config) -> None:
    """Every part checks `new`, then every part applies it; a refusal leaves all on the old."""
    chosen = list(parts)
    for part in chosen:
        part.check(new)
    for part in chosen:
        part.apply(new)


def health_of(parts: Iterable[Part]) -> dict[str, Any]:
    """The parts' /health sections; two parts may share a section (merged one level deep)."""
    sections: dict[str, Any] = {}
    for part in parts:
        for key, value in part.health().items():
            if isinstance(value, dict) and isinstance(sections.get(key), dict):
                sections[key] = {**sections[key], **value}
            else:
                sections[key] = value
    return sections


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a part's own background task and wait until it has really ended."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Waiters:
    """Whoever waits for a condition to hold (a drain, for the work to end), each on a future of
    its own made only while it waits. A condition that comes and goes with every task then
    costs each task a look at `futures`, not an asyncio.Event cleared and set again."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[None]] = []  # one per waiter, while it waits

    async def wait(self) -> None:
        """Return once `wake` is called."""
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        try:
            await future
        finally:
            self.futures.remove(future)

    def wake(self) -> None:
        for future in self.futures:
            if not future.done():
                future.set_result(None)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
