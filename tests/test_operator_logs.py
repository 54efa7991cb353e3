"""Logs for people, read off a real daemon: a failing function's traceback in its summary line,
the access log when asked for, and who switched maintenance or reloaded."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import AUTH_KEY, LB_KEY, task
from tests.daemon import Daemon, events, poll, post_task, start_daemon

pytestmark = pytest.mark.timeout(60)


async def _true(value: bool) -> bool:
    return value


async def test_a_failing_function_logs_its_traceback_with_its_summary_line(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = await start_daemon(daemons, tmp_path)
    async with aiohttp.ClientSession() as session:
        status, body = await post_task(session, daemon, task("fail", input={"message": "kaput"}))
    assert (status, body) == (500, {"success": False, "error": "kaput"})  # the message only
    await poll(lambda: _true(bool(events(daemon, "task"))))
    (summary,) = events(daemon, "task")
    assert summary["outcome"] == "failed" and summary["function"] == "fail"
    assert summary["traceback"].startswith("Traceback (most recent call last):")
    assert summary["traceback"].endswith("ValueError: kaput")
    assert "testing.py" in summary["traceback"]  # the user's own frame is in it


async def test_under_journald_the_traceback_stays_in_its_event(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = await start_daemon(daemons, tmp_path, logging={"format": "journal"})
    async with aiohttp.ClientSession() as session:
        await post_task(session, daemon, task("fail"))
    await poll(lambda: _true(any("Traceback" in line for line in daemon.output)))
    # Every line journald reads carries its priority: a traceback spread over lines would not.
    assert all(line.startswith("<") for line in daemon.output if line), daemon.output
    (line,) = [line for line in daemon.output if "Traceback" in line]
    assert line.startswith("<4>") and "ValueError: boom" in line


async def test_the_access_log_when_asked_for(daemons: list[Daemon], tmp_path: Path) -> None:
    (tmp_path / "quiet").mkdir()
    (tmp_path / "loud").mkdir()
    quiet = await start_daemon(daemons, tmp_path / "quiet")
    loud = await start_daemon(daemons, tmp_path / "loud", logging={"access": True})
    async with aiohttp.ClientSession() as session:
        for daemon in (quiet, loud):
            async with session.get(f"{daemon.url}/health") as response:
                assert response.status == 200
            async with session.get(f"{daemon.url}/nowhere") as response:
                assert response.status == 404
    await poll(lambda: _true(len(events(loud, "request")) == 2))
    health, missing = events(loud, "request")
    assert (health["method"], health["path"], health["status"]) == ("GET", "/health", 200)
    assert health["bytes"] > 0 and health["duration_ms"] >= 0
    assert health["peer"] == "127.0.0.1"
    assert (missing["path"], missing["status"]) == ("/nowhere", 404)
    assert events(quiet, "request") == []


async def test_maintenance_switches_and_reloads_say_who_asked(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = await start_daemon(daemons, tmp_path)
    async with aiohttp.ClientSession() as session:
        as_balancer = {"Authorization": AUTH_KEY, "x-lb-auth": LB_KEY}
        async with session.post(f"{daemon.url}/off", headers=as_balancer) as response:
            assert response.status == 200
        async with session.post(f"{daemon.url}/on", headers={"Authorization": AUTH_KEY}) as r:
            assert r.status == 200
    daemon.signal(signal.SIGHUP)
    await poll(lambda: _true(bool(events(daemon, "configuration reloaded"))))
    (off,) = events(daemon, "maintenance mode enabled")
    (on,) = events(daemon, "maintenance mode disabled")
    assert (off["by"], off["peer"]) == ("load balancer", "127.0.0.1")
    assert (on["by"], on["peer"]) == ("operator", "127.0.0.1")
    assert events(daemon, "configuration reloaded")[0]["by"] == "SIGHUP"
