"""The part lifecycle: start in order, stop in reverse, a failed start leaves nothing running,
and a reload is taken by every part or by none."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import unused_port
from structlog.testing import capture_logs

from tests.conftest import Running, make_config
from tests.daemon import Daemon
from worker import config, parts
from worker.config import Config
from worker.parts import (
    Part,
    ReloadRefused,
    apply_all,
    cancel_and_wait,
    health_of,
    stop_all,
)


class Recording(parts.Part):
    """A part that writes what happens to it into a shared journal."""

    def __init__(self, name: str, journal: list[str], fail: str = "") -> None:
        self.name = name
        self.journal = journal
        self.fail = fail
        self.applied: config.Config | None = None

    async def start(self) -> None:
        if self.fail == "start":
            raise RuntimeError(f"{self.name} cannot start")
        self.journal.append(f"start {self.name}")

    async def stop(self, deadline: float) -> None:
        self.journal.append(f"stop {self.name}")
        if self.fail == "stop":
            raise RuntimeError(f"{self.name} cannot stop")

    def check(self, new: config.Config) -> None:
        if self.fail == "reload":
            raise parts.ReloadRefused(f"{self.name} refuses")

    def apply(self, new: config.Config) -> None:
        self.applied = new
        self.journal.append(f"apply {self.name}")

    def health(self) -> dict[str, Any]:
        return {"parts": {self.name: "up"}, self.name: 1}


async def test_parts_start_in_order_and_stop_in_reverse() -> None:
    journal: list[str] = []
    chain = [Recording(name, journal) for name in "abc"]
    await parts.start_all(chain)
    await parts.stop_all(chain, asyncio.get_running_loop().time())
    assert journal == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


async def test_a_part_that_fails_to_start_stops_those_already_started() -> None:
    journal: list[str] = []
    chain = [Recording("a", journal), Recording("b", journal), Recording("c", journal, "start")]
    chain.append(Recording("d", journal))
    with pytest.raises(parts.StartFailed) as failed:
        await parts.start_all(chain)
    assert failed.value.part == "c"
    assert str(failed.value) == "c: RuntimeError: c cannot start"
    assert journal == ["start a", "start b", "stop b", "stop a"]


async def test_a_part_that_fails_to_stop_does_not_keep_the_others_running() -> None:
    journal: list[str] = []
    chain = [Recording("a", journal), Recording("b", journal, "stop"), Recording("c", journal)]
    await parts.stop_all(chain, asyncio.get_running_loop().time())
    assert journal == ["stop c", "stop b", "stop a"]


def test_a_reload_refused_by_one_part_is_applied_by_none() -> None:
    journal: list[str] = []
    chain = [Recording("a", journal), Recording("b", journal, "reload"), Recording("c", journal)]
    with pytest.raises(parts.ReloadRefused, match="b refuses"):
        parts.apply_all(chain, make_config())
    assert journal == []
    assert all(part.applied is None for part in chain)

    accepted = [Recording("a", journal), Recording("c", journal)]
    parts.apply_all(accepted, make_config())
    assert journal == ["apply a", "apply c"]


def test_health_sections_of_several_parts_merge_one_level_deep() -> None:
    journal: list[str] = []
    merged = parts.health_of([Recording("a", journal), Recording("b", journal)])
    assert merged == {"parts": {"a": "up", "b": "up"}, "a": 1, "b": 1}


async def test_a_refused_reload_keeps_the_old_config_in_every_real_part() -> None:
    running = Running(make_config(worker={"slots": 3}, load_balancer={"url": ""}))
    refusing = Recording("refusing", [], "reload")
    chain = [*running.parts, refusing]
    await parts.start_all(running.parts)
    try:
        old = running.config
        new = dataclasses.replace(
            old,
            worker=dataclasses.replace(old.worker, slots=9, default_timeout=2.0),
            auth=dataclasses.replace(old.auth, auth_key="another-key-0123456789"),
        )
        with pytest.raises(parts.ReloadRefused):
            parts.apply_all(chain, new)
        assert running.slots.state().limit == 3
        assert running.worker.runner.default_timeout == old.worker.default_timeout
        health = running.worker.outbound.health()["loadBalancer"]
        assert health["enabled"] is False

        parts.apply_all(running.parts, new)
        assert running.slots.state().limit == 9
        assert running.worker.runner.default_timeout == 2.0
    finally:
        await parts.stop_all(running.parts, asyncio.get_running_loop().time())


async def test_a_part_failing_at_start_exits_non_zero_naming_it(tmp_path: Path) -> None:
    """The load balancer websocket cannot bind: the daemon says so, never serves, exits 1."""
    taken = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", unused_port())
    port = taken.sockets[0].getsockname()[1]
    daemon = Daemon(tmp_path, load_balancer={"websocket_port": port})
    try:
        await daemon.start()
        assert await daemon.wait_exit() == 1
        events = [json.loads(line) for line in daemon.log_events()]
        failure = next(e for e in events if e["event"] == "cannot start")
        assert failure["part"] == "load balancer websocket"
        assert str(port) in failure["reason"]
        assert not any(e["event"] == "base-worker started" for e in events)
        assert "READY=1" not in daemon.fields()
    finally:
        await daemon.stop()
        taken.close()
        await taken.wait_closed()


# --- each loop's rules in detail ----------------------------------------------------------------


class Journaled(Part):
    """Like Recording, and it also journals its checks and has the health sections it is given."""

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


async def test_a_part_that_fails_to_stop_is_logged_and_the_others_still_stop() -> None:
    journal: list[str] = []
    chain = [
        Journaled("a", journal),
        Journaled("b", journal, fail_stop=True),
        Journaled("c", journal),
    ]
    with capture_logs() as logged:
        await stop_all(chain, asyncio.get_running_loop().time() + 5)
    assert journal == ["stop c", "stop b", "stop a"]
    errors = [e for e in logged if e["log_level"] == "error"]
    assert [(e["event"], e["part"], e["reason"]) for e in errors] == [
        ("part failed to stop", "b", "RuntimeError: stuck")
    ]


def test_a_reload_is_checked_by_every_part_before_any_applies_it() -> None:
    journal: list[str] = []
    chain = [Journaled(name, journal) for name in ("a", "b")]
    new = make_config(worker={"slots": 3})
    apply_all(chain, new)
    assert journal == ["check a", "check b", "apply a", "apply b"]
    assert all(part.config is new for part in chain)


def test_apply_all_takes_any_iterable_once() -> None:
    journal: list[str] = []
    chain = [Journaled(name, journal) for name in ("a", "b")]
    apply_all((part for part in chain), make_config())  # a generator is read once, fully
    assert journal == ["check a", "check b", "apply a", "apply b"]


def test_health_sections_are_merged_one_level_deep() -> None:
    journal: list[str] = []
    chain = [
        Journaled("outbound", journal, sections={"loadBalancer": {"url": "ws://x", "n": 1}}),
        Journaled("inbound", journal, sections={"loadBalancer": {"inbound": {"port": 3001}}}),
        Journaled("deliveries", journal, sections={"webhooks": {"pending": 0}}),
        Journaled("plain", journal, sections={"note": "first"}),
        Journaled("later", journal, sections={"note": "second", "loadBalancer": {"n": 2}}),
    ]
    assert health_of(chain) == {
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
