"""The daemon as systemd runs it: a subprocess, its notify socket, its signals and its exit."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import AUTH_KEY, task
from tests.daemon import Daemon, health, poll, post_task, start_daemon, write_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def start(
    daemons: list[Daemon], tmp: Path, env: dict[str, str] | None = None, **sections: dict
) -> Daemon:
    home = tmp / f"daemon{len(daemons)}"
    home.mkdir()
    return await start_daemon(daemons, home, env, **sections)


async def test_ready_is_sent_once_the_listener_answers(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    daemon = await start(daemons, tmp_path)
    # No retry: READY=1 promises the listener is bound and the functions imported.
    body = await health(session, daemon)
    assert body["status"] == "ready"
    assert {f["name"] for f in body["functions"]} >= {"hello", "sleep"}
    assert any(f.startswith("STATUS=ready: 0/10 slots busy") for f in daemon.fields())


async def test_watchdog_keeps_its_cadence_while_a_plain_def_blocks(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    daemon = await start(daemons, tmp_path, env={"WATCHDOG_USEC": "200000"})
    blocking = asyncio.create_task(
        post_task(session, daemon, task("block", input={"seconds": 1.5}))
    )
    await poll(lambda: _used(session, daemon, 1))
    window_start = time.monotonic()
    await asyncio.sleep(1.0)  # the observation window itself, not synchronisation
    pings = [t for t, m in daemon.messages if m == "WATCHDOG=1" and t >= window_start]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 7, pings  # one every 0.1 s
    assert max(gaps) < 0.25, gaps
    status, answer = await blocking
    assert (status, answer["result"]) == (200, {"blocked": 1.5})


async def test_a_notify_socket_nobody_reads_never_freezes_the_loop(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    home = tmp_path / "unread"
    home.mkdir()
    daemon = Daemon(home)
    daemons.append(daemon)
    # A ping every 5 ms fills the socket's queue within a second or two.
    await daemon.start(env={"WATCHDOG_USEC": "10000"}, read_notify=False)

    async def answers() -> bool:
        try:
            return (await health(session, daemon))["status"] == "ready"
        except aiohttp.ClientConnectionError:
            return False

    await poll(answers)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # well past the queue filling up
        async with asyncio.timeout(1):
            assert await answers()


async def _used(session: aiohttp.ClientSession, daemon: Daemon, used: int, queue: int = 0) -> bool:
    slots = (await health(session, daemon))["slots"]
    return bool(slots["used"] == used and slots["queue"] == queue)


async def test_sighup_reloads_the_slot_count(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    daemon = await start(daemons, tmp_path, worker={"slots": 2})
    config_text = daemon.config_path.read_text()
    daemon.config_path.write_text(config_text.replace("slots = 2", "slots = 5"))
    daemon.messages.clear()
    daemon.signal(signal.SIGHUP)
    await daemon.wait_notify(lambda f: f == "READY=1")
    fields = daemon.fields()
    assert fields.index("RELOADING=1") < fields.index("READY=1")
    assert any(f.startswith("MONOTONIC_USEC=") and int(f.split("=")[1]) > 0 for f in fields)
    assert (await health(session, daemon))["slots"]["limit"] == 5


async def test_a_broken_config_on_reload_keeps_the_old_one(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    daemon = await start(daemons, tmp_path, worker={"slots": 2})
    daemon.config_path.write_text("[worker]\nslots = -4\n")
    daemon.messages.clear()
    daemon.signal(signal.SIGHUP)
    await daemon.wait_notify(lambda f: f == "READY=1")
    assert (await health(session, daemon))["slots"]["limit"] == 2
    refused = [json.loads(line) for line in daemon.log_events() if "reload refused" in line]
    assert refused and "worker.slots must be at least 1" in refused[0]["reason"]
    status, body = await post_task(session, daemon, task("hello"))
    assert (status, body["result"]) == (200, {"message": "Hello World!"})


async def test_sigterm_drains_running_and_queued_tasks(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    daemon = await start(daemons, tmp_path, worker={"slots": 3})
    clients = [
        asyncio.create_task(post_task(session, daemon, task("sleep", input={"seconds": 0.8})))
        for _ in range(8)
    ]
    await poll(lambda: _used(session, daemon, 3, queue=5))
    daemon.signal(signal.SIGTERM)
    await daemon.wait_notify(lambda f: f == "STOPPING=1")
    status, body = await post_task(session, daemon, task("hello"))
    assert (status, body["error"]) == (503, "Worker is draining for shutdown")
    public = await (await session.get(f"{daemon.url}/health")).json()
    assert public == {"status": "draining"}
    answers = await asyncio.gather(*clients)
    assert [status for status, _ in answers] == [200] * 8
    assert await daemon.wait_exit() == 0
    assert any(f.startswith("EXTEND_TIMEOUT_USEC=") for f in daemon.fields())
    last = json.loads(daemon.log_events()[-1])
    assert (last["event"], last["completed"], last["cancelled"]) == ("stopped", 8, 0)


async def test_on_and_off_answer_409_while_draining_and_change_nothing(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """/off during a drain answered 200 `maintenance` while /health said `draining`."""
    daemon = await start(daemons, tmp_path)
    running = asyncio.create_task(post_task(session, daemon, task("sleep", input={"seconds": 1})))
    await poll(lambda: _used(session, daemon, 1))
    daemon.signal(signal.SIGTERM)
    await daemon.wait_notify(lambda f: f == "STOPPING=1")
    for path in ("/off", "/on"):
        async with session.post(f"{daemon.url}{path}", headers={"Authorization": AUTH_KEY}) as r:
            body = await r.json()
            assert (r.status, body["success"]) == (409, False), body
            assert "draining" in body["error"]
    assert (await health(session, daemon))["status"] == "draining"
    status, _ = await running
    assert status == 200
    assert await daemon.wait_exit() == 0


async def test_the_drain_deadline_cancels_what_is_left_with_503(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    daemon = await start(daemons, tmp_path, worker={"slots": 1, "drain_timeout": 0.5})
    clients = [
        asyncio.create_task(post_task(session, daemon, task("sleep", input={"seconds": 30})))
        for _ in range(2)
    ]
    await poll(lambda: _used(session, daemon, 1, queue=1))
    daemon.signal(signal.SIGTERM)
    answers = await asyncio.gather(*clients)
    assert [status for status, _ in answers] == [503, 503]
    assert all("shutting down" in body["error"] for _, body in answers)
    assert await daemon.wait_exit() == 0
    last = json.loads(daemon.log_events()[-1])
    assert (last["event"], last["completed"], last["cancelled"]) == ("stopped", 0, 2)


async def test_a_second_sigterm_stops_at_once(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    daemon = await start(daemons, tmp_path, worker={"drain_timeout": 60})
    client = asyncio.create_task(post_task(session, daemon, task("sleep", input={"seconds": 30})))
    await poll(lambda: _used(session, daemon, 1))
    daemon.signal(signal.SIGTERM)
    await daemon.wait_notify(lambda f: f == "STOPPING=1")
    stopped_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert time.monotonic() - stopped_at < 10
    status, _ = await client
    assert status == 503


async def test_socket_activation_serves_on_the_passed_socket(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    fd = listener.fileno()
    daemon = Daemon(tmp_path)
    daemons.append(daemon)
    # The config names another port; serving on ours proves the passed socket is used.
    daemon.port = listener.getsockname()[1]
    # LISTEN_PID must be the daemon's own pid: a wrapper moves the socket to fd 3, then execs.
    move = (
        f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    wrapper = [sys.executable, "-c", move]
    await daemon.start(argv_prefix=wrapper, pass_fds=(fd,))
    listener.close()
    await daemon.wait_ready()
    status, body = await post_task(session, daemon, task("hello", input={"name": "fd3"}))
    assert (status, body["result"]) == (200, {"message": "Hello fd3!"})


async def test_maintenance_mode_survives_a_restart_with_state_dir(
    daemons: list[Daemon], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    state = tmp_path / "state"
    first = await start(daemons, tmp_path, worker={"state_dir": str(state)})
    off = await session.post(f"{first.url}/off", headers={"Authorization": AUTH_KEY})
    assert off.status == 200
    first.signal(signal.SIGTERM)
    assert await first.wait_exit() == 0

    second = await start(daemons, tmp_path, worker={"state_dir": str(state)})
    assert (await health(session, second))["status"] == "maintenance"
    on = await session.post(f"{second.url}/on", headers={"Authorization": AUTH_KEY})
    assert on.status == 200
    second.signal(signal.SIGTERM)
    assert await second.wait_exit() == 0
    assert not (state / "maintenance").exists()


async def test_journald_lines_carry_priority_prefixes_and_no_timestamp(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.toml"
    write_config(config, logging={"format": "auto"}, auth={"auth_key": "dev-only-auth-key"})
    read_end, write_end = os.pipe()
    stat = os.fstat(write_end)
    env = {**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
    env.pop("NOTIFY_SOCKET", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "--config", str(config),
        env=env, stdout=write_end, stderr=write_end,
    )  # fmt: skip
    os.close(write_end)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb")
    )
    try:
        lines = []
        while not any("DEV-ONLY" in line for line in lines):
            lines.append((await asyncio.wait_for(reader.readline(), 10)).decode())
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        transport.close()
        if process.returncode is None:
            process.kill()
    started = next(line for line in lines if "base-worker started" in line)
    warning = next(line for line in lines if "DEV-ONLY" in line)
    assert started.startswith("<6>") and warning.startswith("<4>")
    assert not re.search(r"\d{4}-\d\d-\d\dT", started)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[int], dict[str, int]]]:
    """A webhook receiver on loopback answering 503 to the first `fail` calls, then 200."""
    from aiohttp import web

    statuses: list[int] = []
    settings = {"fail": 2}

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        status = 503 if len(statuses) < settings["fail"] else 200
        statuses.append(status)
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/hook", statuses, settings
    await runner.cleanup()


async def test_sigterm_waits_for_a_webhook_delivery_being_retried(
    daemons: list[Daemon],
    tmp_path: Path,
    session: aiohttp.ClientSession,
    receiver: tuple[str, list[int], dict[str, int]],
) -> None:
    url, statuses, _ = receiver
    daemon = await start(daemons, tmp_path, webhook={"retry_delay": 0.2, "max_retries": 3})
    body = task("sleep", input={"seconds": 0.1}, mode="webhook", webhook={"url": url})
    status, _ = await post_task(session, daemon, body)
    assert status == 202
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert statuses == [503, 503, 200]
    last = json.loads(daemon.log_events()[-1])
    assert (last["event"], last["completed"], last["undelivered"]) == ("stopped", 1, 0)


async def test_the_drain_deadline_counts_undelivered_webhooks(
    daemons: list[Daemon],
    tmp_path: Path,
    session: aiohttp.ClientSession,
    receiver: tuple[str, list[int], dict[str, int]],
) -> None:
    url, statuses, settings = receiver
    settings["fail"] = 1000
    daemon = await start(
        daemons,
        tmp_path,
        worker={"drain_timeout": 0.5},
        webhook={"retry_delay": 5.0, "max_retries": 3},
    )
    body = task("hello", mode="webhook", webhook={"url": url})
    status, _ = await post_task(session, daemon, body)
    assert status == 202
    await poll(lambda: _true(len(statuses) >= 1))
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    last = json.loads(daemon.log_events()[-1])
    assert (last["event"], last["undelivered"]) == ("stopped", 1)


async def _true(value: bool) -> bool:
    return value
