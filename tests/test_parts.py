"""The one shape of a long-lived part and the loops over them (worker/parts.py): start in order,
stop in reverse, a reload checked by all before any applies it, merged health sections."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import make_config
from worker.config import Config
from worker.parts import (
    Part,
    ReloadRefused,
    StartFailed,
    apply_all,
    cancel_and_wait,
    health_of,
    start_all,
    stop_all,
)


class Recorder(Part):
    """A part that writes what happens to it into a shared journal, and fails when told to."""

    def __init__(
        self,
        name: str,
        journal: list[str],
        *,
        fail_start: bool = False,
        fail_stop: bool = False,
        refuse: bool = False,
        sections: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.journal = journal
        self.fail_start = fail_start
        self.fail_stop = fail_stop
        self.refuse = refuse
        self.sections = sections or {}
        self.config: Config | None = None

    async def start(self) -> None:
        self.journal.append(f"start {self.name}")
        if self.fail_start:
            raise OSError("address already in use")

    async def stop(self, deadline: float) -> None:
        self.journal.append(f"stop {self.name}")
        if self.fail_stop:
            raise RuntimeError("stuck")

    def check(self, new: Config) -> None:
        self.journal.append(f"check {self.name}")
        if self.refuse:
            raise ReloadRefused(f"{self.name} cannot change live")

    def apply(self, new: Config) -> None:
        self.journal.append(f"apply {self.name}")
        self.config = new

    def health(self) -> dict[str, Any]:
        return self.sections


async def test_parts_start_in_order_and_stop_in_reverse() -> None:
    journal: list[str] = []
    parts = [Recorder(name, journal) for name in ("a", "b", "c")]
    await start_all(parts)
    await stop_all(parts, asyncio.get_running_loop().time() + 5)
    assert journal == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


async def test_a_part_that_cannot_start_stops_those_before_it() -> None:
    journal: list[str] = []
    parts = [
        Recorder("a", journal),
        Recorder("b", journal),
        Recorder("listener", journal, fail_start=True),
        Recorder("never", journal),
    ]
    with pytest.raises(StartFailed) as caught:
        await start_all(parts)
    assert journal == ["start a", "start b", "start listener", "stop b", "stop a"]
    assert caught.value.part == "listener"
    assert str(caught.value) == "listener: OSError: address already in use"
    assert isinstance(caught.value.__cause__, OSError)


async def test_a_part_that_fails_to_stop_is_logged_and_the_others_still_stop() -> None:
    journal: list[str] = []
    parts = [Recorder("a", journal), Recorder("b", journal, fail_stop=True), Recorder("c", journal)]
    with capture_logs() as logged:
        await stop_all(parts, asyncio.get_running_loop().time() + 5)
    assert journal == ["stop c", "stop b", "stop a"]
    errors = [e for e in logged if e["log_level"] == "error"]
    assert [(e["event"], e["part"], e["reason"]) for e in errors] == [
        ("part failed to stop", "b", "RuntimeError: stuck")
    ]


def test_a_reload_is_checked_by_every_part_before_any_applies_it() -> None:
    journal: list[str] = []
    parts = [Recorder(name, journal) for name in ("a", "b")]
    new = make_config(worker={"slots": 3})
    apply_all(parts, new)
    assert journal == ["check a", "check b", "apply a", "apply b"]
    assert all(part.config is new for part in parts)


def test_a_refused_reload_leaves_every_part_on_the_old_config() -> None:
    journal: list[str] = []
    parts = [Recorder("a", journal), Recorder("b", journal, refuse=True), Recorder("c", journal)]
    with pytest.raises(ReloadRefused, match="b cannot change live"):
        apply_all(parts, make_config())
    assert journal == ["check a", "check b"]
    assert all(part.config is None for part in parts)


def test_apply_all_takes_any_iterable_once() -> None:
    journal: list[str] = []
    parts = [Recorder(name, journal) for name in ("a", "b")]
    apply_all((part for part in parts), make_config())  # a generator is read once, fully
    assert journal == ["check a", "check b", "apply a", "apply b"]


def test_health_sections_are_merged_one_level_deep() -> None:
    journal: list[str] = []
    parts = [
        Recorder("outbound", journal, sections={"loadBalancer": {"url": "ws://x", "n": 1}}),
        Recorder("inbound", journal, sections={"loadBalancer": {"inbound": {"port": 3001}}}),
        Recorder("deliveries", journal, sections={"webhooks": {"pending": 0}}),
        Recorder("plain", journal, sections={"note": "first"}),
        Recorder("later", journal, sections={"note": "second", "loadBalancer": {"n": 2}}),
    ]
    assert health_of(parts) == {
        "loadBalancer": {"url": "ws://x", "n": 2, "inbound": {"port": 3001}},
        "webhooks": {"pending": 0},
        "note": "second",
    }
    assert health_of([Part()]) == {}


async def test_the_default_part_does_nothing_and_takes_any_reload() -> None:
    part = Part()
    await part.start()
    part.check(make_config())
    part.apply(make_config())
    await part.stop(asyncio.get_running_loop().time())
    assert part.health() == {}


async def test_cancel_and_wait_returns_once_the_task_has_really_ended() -> None:
    started = asyncio.Event()
    cleaned: list[bool] = []

    async def background() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    task = asyncio.create_task(background())
    await started.wait()
    await cancel_and_wait(task)
    assert task.cancelled()
    assert cleaned == [True]
    await cancel_and_wait(task)  # already done: nothing to do
    await cancel_and_wait(None)
