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

from tests.conftest import Running, make_config
from tests.daemon import Daemon
from worker import config, parts


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
