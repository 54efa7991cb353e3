"""`base-worker ctl` as an operator runs it: a subprocess against a live daemon (or a fake one
speaking the contract's dead letter API), checked by its output and its exit code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, unused_port

from tests.conftest import AUTH_KEY, LB_KEY, ROOT, make_config, task
from tests.daemon import Daemon, post_task, write_config
from tests.test_config import clean_env
from worker import __version__, cli, ctl

pytestmark = pytest.mark.timeout(90)

CTL = [sys.executable, "-m", "worker", "ctl"]
ANSI = "\033["
WRONG_KEY = "a-wrong-key-that-is-long-enough"


def env(**extra: str) -> dict[str, str]:
    base = clean_env(**extra)
    for name in ("BASE_WORKER_KEY", "NO_COLOR"):
        if name not in extra:
            base.pop(name, None)
    return base


@dataclass
class Result:
    code: int
    out: str
    err: str


async def ctl_run(*args: str, environ: dict[str, str] | None = None, timeout: float = 30) -> Result:
    """Run `python -m worker ctl ARGS` to its end; no output may hold a key."""
    process = await asyncio.create_subprocess_exec(
        *CTL,
        *args,
        cwd=ROOT,
        env=environ or env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"ctl {' '.join(args)} did not end in {timeout} s") from None
    result = Result(process.returncode or 0, out.decode(), err.decode())
    for key in (AUTH_KEY, LB_KEY, WRONG_KEY):
        assert key not in result.out + result.err, result
    assert "Traceback" not in result.err, result.err
    return result


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    running = Daemon(tmp_path)
    await running.start()
    try:
        await running.wait_ready()
        yield running
    finally:
        await running.stop()


def screen(text: str) -> dict[str, str]:
    """`label   value` lines of the status screen as a mapping."""
    rows = [re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines() if line]
    return {row[0]: row[1] for row in rows}


async def test_status_for_people_and_for_scripts(daemon: Daemon) -> None:
    config = str(daemon.config_path)
    result = await ctl_run("--config", config, "status")
    assert result.code == 0, result
    rows = screen(result.out)
    assert rows["status"] == "ready"
    assert rows["slots"] == "0/10 used"
    assert rows["queue"] == "0 waiting"
    assert rows["webhooks"] == "0 pending"
    assert rows["load balancer"] == "inbound off; outbound off"
    assert rows["services"] == "none"
    assert rows["version"] == __version__
    assert re.fullmatch(r"\d+s", rows["uptime"]), rows
    assert daemon.url in rows["worker"]
    assert rows["dead letters"] == "0"
    values = [
        line.index(rows[label]) for label, line in zip(rows, result.out.splitlines(), strict=True)
    ]
    assert len(set(values)) == 1, result.out  # one column
    assert ANSI not in result.out  # not a terminal

    result = await ctl_run("--config", config, "status", "--json")
    assert result.code == 0, result
    health = json.loads(result.out)
    assert health["status"] == "ready" and health["slots"]["limit"] == 10
    assert health["version"] == __version__ and "functions" in health


async def test_the_config_is_found_as_the_daemon_finds_it(daemon: Daemon, tmp_path: Path) -> None:
    config = str(daemon.config_path)
    result = await ctl_run("status", environ=env(BASE_WORKER_CONFIG=config))
    assert result.code == 0, result
    program = [sys.executable, "-m", "worker", "--config", config, "ctl", "status"]
    answer = await asyncio.to_thread(
        subprocess.run, program, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=30
    )
    assert answer.returncode == 0, answer.stderr  # the daemon's own --config, before `ctl`
    # The environment overrides the file, as for the daemon: the file's port is wrong here.
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(daemon.config_path.read_text().replace(str(daemon.port), "9"))
    assert (await ctl_run("--config", str(elsewhere), "status")).code == 4
    result = await ctl_run("--config", str(elsewhere), "status", environ=env(PORT=str(daemon.port)))
    assert result.code == 0, result


async def test_off_makes_status_exit_3_until_on(daemon: Daemon) -> None:
    config = ("--config", str(daemon.config_path))
    result = await ctl_run(*config, "off")
    assert result.code == 0, result
    assert "Maintenance mode enabled" in result.out

    result = await ctl_run(*config, "status")
    assert result.code == 3, result
    assert screen(result.out)["status"] == "maintenance"
    result = await ctl_run(*config, "status", "--json")
    assert result.code == 3 and json.loads(result.out)["status"] == "maintenance"

    result = await ctl_run(*config, "on", "--json")
    assert result.code == 0, result
    assert json.loads(result.out) == {"status": "ready", "message": "Maintenance mode disabled"}
    assert (await ctl_run(*config, "status")).code == 0


async def test_logs_prints_the_last_lines(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as session:
        for n in range(6):
            status, _ = await post_task(session, daemon, task("log_line", input={"text": f"m{n}"}))
            assert status == 200
    result = await ctl_run("--config", str(daemon.config_path), "logs", "-n", "5")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert len(lines) == 5, lines
    assert all("event" in json.loads(line) for line in lines)
    assert "m5" in "\n".join(lines)
    assert (await ctl_run("--config", str(daemon.config_path), "logs", "-n", "x")).code == 2


class Lines:
    """The lines a running process writes to one of its pipes, collected as they come."""

    def __init__(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        self.lines: list[str] = []
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode().rstrip("\n"))

    async def wait_for(self, predicate: Callable[[str], bool], timeout: float = 20) -> int:
        """The index of the first line matching `predicate`, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for index, line in enumerate(self.lines):
                if predicate(line):
                    return index
            if time.monotonic() > deadline:
                raise AssertionError(f"no such line in time; got {self.lines}")
            await asyncio.sleep(0.02)


async def log_text(daemon: Daemon, text: str) -> None:
    async with aiohttp.ClientSession() as session:
        status, _ = await post_task(session, daemon, task("log_line", input={"text": text}))
        assert status == 200


async def test_logs_follow_survives_a_restart_and_ends_on_ctrl_c(tmp_path: Path) -> None:
    first = Daemon(tmp_path)
    (tmp_path / "second").mkdir()
    second = Daemon(tmp_path / "second", http={"port": first.port})
    await first.start()
    await first.wait_ready()
    follower = await asyncio.create_subprocess_exec(
        *CTL,
        "--config",
        str(first.config_path),
        "logs",
        "-f",
        "-n",
        "1",
        cwd=ROOT,
        env=env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = Lines(follower.stdout), Lines(follower.stderr)
    try:
        await out.wait_for(lambda line: True)  # the one line asked for: it follows now
        await log_text(first, "before-the-restart")
        await out.wait_for(lambda line: "before-the-restart" in line)

        first.signal(signal.SIGTERM)
        assert await first.wait_exit() == 0
        await err.wait_for(lambda line: line == "-- connection lost, reconnecting --")
        await second.start()
        await second.wait_ready()
        await err.wait_for(lambda line: line == "-- reconnected --")
        await log_text(second, "after-the-restart")
        await out.wait_for(lambda line: "after-the-restart" in line)
        before = await out.wait_for(lambda line: "before-the-restart" in line)
        after = await out.wait_for(lambda line: "after-the-restart" in line)
        started = [i for i, line in enumerate(out.lines) if "base-worker started" in line]
        assert any(before < i < after for i in started), out.lines  # the new daemon's start-up

        follower.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(follower.wait(), 10) == 0
        await asyncio.wait_for(asyncio.gather(out._task, err._task), 5)
        assert not any("Traceback" in line for line in err.lines), err.lines
        assert not any(AUTH_KEY in line for line in out.lines + err.lines)
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
        await first.stop()
        await second.stop()


async def test_a_stopped_worker_is_exit_4_naming_the_address(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    write_config(path)
    port = next(
        line.split("=")[1].strip() for line in path.read_text().splitlines() if "port" in line
    )
    for command in (["status"], ["off"], ["logs", "-f"]):
        result = await ctl_run("--config", str(path), *command)
        assert result.code == 4, result
        assert f"cannot reach the worker at http://127.0.0.1:{port}" in result.err, result.err
        assert str(path) in result.err
    hidden = f"http://operator:a-url-password@127.0.0.1:{port}"
    result = await ctl_run("--url", hidden, "status", environ=env(BASE_WORKER_KEY=AUTH_KEY))
    assert result.code == 4 and f"127.0.0.1:{port}" in result.err, result
    assert "a-url-password" not in result.err


@pytest.fixture
async def flaky_worker() -> AsyncIterator[tuple[str, list[str]]]:
    """A fake worker whose log stream ends after one line, then answers 502 twice (a proxy in
    front of a restarting worker), then streams again; records each follow's `lines`."""
    asked: list[str] = []

    async def logs(request: web.Request) -> web.StreamResponse:
        asked.append(request.query.get("lines", ""))
        if len(asked) in (2, 3):
            return web.json_response({"success": False, "error": "Bad Gateway"}, status=502)
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(f"line {len(asked)}\n".encode())
        return response

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "slots": {}, "system": {"uptime": 1e6}})

    app = web.Application()
    app.router.add_get("/logs", logs)
    app.router.add_get("/health", health)
    server = TestServer(app, host="127.0.0.1", port=unused_port())
    await server.start_server()
    try:
        yield str(server.make_url("")), asked
    finally:
        await server.close()


async def test_logs_follow_ends_quietly_when_its_reader_goes(
    flaky_worker: tuple[str, list[str]],
) -> None:
    url, _ = flaky_worker

    def follow_into_head() -> tuple[int, str]:
        with subprocess.Popen(
            [*CTL, "--url", url, "logs", "-f"],
            cwd=ROOT,
            env=env(BASE_WORKER_KEY=AUTH_KEY),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as process:
            assert process.stdout is not None and process.stderr is not None
            try:
                assert process.stdout.readline() == b"line 1\n"
                process.stdout.close()  # as `| head -1` does
                return process.wait(timeout=20), process.stderr.read().decode()
            finally:
                if process.poll() is None:
                    process.kill()

    code, err = await asyncio.to_thread(follow_into_head)
    assert code == 0, err
    assert "Traceback" not in err


async def test_logs_follow_reconnects_through_a_proxy_error(
    flaky_worker: tuple[str, list[str]],
) -> None:
    url, asked = flaky_worker
    follower = await asyncio.create_subprocess_exec(
        *CTL,
        "--url",
        url,
        "logs",
        "-f",
        cwd=ROOT,
        env=env(BASE_WORKER_KEY=AUTH_KEY),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = Lines(follower.stdout), Lines(follower.stderr)
    try:
        await out.wait_for(lambda line: line == "line 4")
        assert out.lines[:2] == ["line 1", "line 4"]
        assert err.lines[:2] == ["-- connection lost, reconnecting --", "-- reconnected --"]
        # 10 lines at first, like tail -f; none again from the same process (its uptime says so).
        assert asked[:4] == ["10", "0", "0", "0"]
        follower.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(follower.wait(), 10) == 0
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()


async def test_url_with_the_key_in_the_environment(daemon: Daemon) -> None:
    right = env(BASE_WORKER_KEY=AUTH_KEY)
    result = await ctl_run("--url", daemon.url, "status", environ=right)
    assert result.code == 0, result
    assert screen(result.out)["status"] == "ready"

    wrong = env(BASE_WORKER_KEY=WRONG_KEY)
    result = await ctl_run("--url", daemon.url, "off", environ=wrong)
    assert result.code == 1, result
    assert "Missing or invalid Authorization header" in result.err  # the daemon's own sentence
    result = await ctl_run("--url", daemon.url, "logs", environ=wrong)
    assert result.code == 1 and "Missing or invalid credentials" in result.err
    result = await ctl_run("--url", daemon.url, "status", environ=wrong)
    assert result.code == 1 and "did not accept the key" in result.err
    assert (await ctl_run("--url", daemon.url, "status")).code == 2  # no BASE_WORKER_KEY
    result = await ctl_run("--url", daemon.url, "--config", str(daemon.config_path), "status")
    assert result.code == 2  # one or the other


async def test_dead_letters_of_a_live_worker(daemon: Daemon) -> None:
    config = ("--config", str(daemon.config_path))
    result = await ctl_run(*config, "deadletters", "--json")
    assert result.code == 0, result
    assert json.loads(result.out) == {"count": 0, "deadletters": []}
    result = await ctl_run(*config, "deadletters", "redeliver", "--all")
    assert result.code == 0, result
    result = await ctl_run(*config, "deadletters", "purge", "t1")
    assert result.code == 0, result
    for usage in (["deadletters", "purge"], ["deadletters", "redeliver", "t1", "--all"]):
        result = await ctl_run(*config, *usage)
        assert result.code == 2, result
        assert "give task ids or --all" in result.err


LETTERS = [
    {
        "task_id": "task-one",
        "function": "hello",
        "target": "https://example.test/hook",
        "error": "HTTP 500",
        "attempts": 4,
        "failed_at": "2026-01-02T03:04:05Z",
    },
    {
        "task_id": "t2",
        "function": "a_longer_name",
        "target": "https://example.test/other",
        "error": "timed out",
        "attempts": 1,
        "failed_at": "2026-01-02T03:04:06Z",
    },
]


@pytest.fixture
async def dead_letter_worker() -> AsyncIterator[tuple[str, list[Any]]]:
    """A fake worker that speaks the contract's dead letter API; records the POST bodies."""
    bodies: list[Any] = []

    def check(request: web.Request) -> None:
        if request.headers.get("Authorization") != AUTH_KEY:
            raise web.HTTPUnauthorized(
                text=json.dumps({"success": False, "error": "Missing or invalid credentials"}),
                content_type="application/json",
            )

    async def listing(request: web.Request) -> web.Response:
        check(request)
        return web.json_response({"count": len(LETTERS), "deadletters": LETTERS})

    async def redeliver(request: web.Request) -> web.Response:
        check(request)
        bodies.append(await request.json())
        return web.json_response({"redelivering": 2}, status=202)

    async def purge(request: web.Request) -> web.Response:
        check(request)
        bodies.append(await request.json())
        return web.json_response({"purged": 1})

    app = web.Application()
    app.router.add_get("/deadletters", listing)
    app.router.add_post("/deadletters/redeliver", redeliver)
    app.router.add_post("/deadletters/purge", purge)
    server = TestServer(app, host="127.0.0.1", port=unused_port())
    await server.start_server()
    try:
        yield str(server.make_url("")), bodies
    finally:
        await server.close()


async def test_dead_letters_speak_the_contract(dead_letter_worker: tuple[str, list[Any]]) -> None:
    url, bodies = dead_letter_worker
    key = env(BASE_WORKER_KEY=AUTH_KEY)
    result = await ctl_run("--url", url, "deadletters", environ=key)
    assert result.code == 0, result
    header, *rows = result.out.splitlines()
    assert header.split() == [
        "TASK",
        "ID",
        "FUNCTION",
        "ATTEMPTS",
        "FAILED",
        "AT",
        "TARGET",
        "ERROR",
    ]
    assert rows[0].split()[:2] == ["task-one", "hello"] and rows[1].split()[:2] == [
        "t2",
        "a_longer_name",
    ]
    assert header.index("FUNCTION") == rows[1].index("a_longer_name")  # aligned
    assert header.index("ERROR") == rows[0].index("HTTP 500") == rows[1].index("timed out")

    result = await ctl_run("--url", url, "deadletters", "list", "--json", environ=key)
    assert result.code == 0 and json.loads(result.out)["deadletters"] == LETTERS

    result = await ctl_run("--url", url, "deadletters", "redeliver", "task-one", "t2", environ=key)
    assert result.code == 0 and result.out == "redelivering 2 dead letters\n", result
    result = await ctl_run("--url", url, "deadletters", "purge", "--all", "--json", environ=key)
    assert result.code == 0 and json.loads(result.out) == {"purged": 1}
    assert bodies == [{"task_ids": ["task-one", "t2"]}, {"all": True}]

    wrong = env(BASE_WORKER_KEY=WRONG_KEY)
    result = await ctl_run("--url", url, "deadletters", environ=wrong)
    assert result.code == 1 and "Missing or invalid credentials" in result.err


def pty_run(*args: str, **extra: str) -> str:
    """ctl with its stdout on a terminal; what the terminal showed."""
    primary, secondary = os.openpty()
    try:
        process = subprocess.run(
            [*CTL, *args],
            cwd=ROOT,
            env=env(**extra),
            stdout=secondary,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
        os.close(secondary)
        secondary = -1
        shown = b""
        with contextlib.suppress(OSError):  # EIO once everything written was read
            while chunk := os.read(primary, 65536):
                shown += chunk
        assert process.returncode == 0, process.stderr
        return shown.decode()
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)


async def test_colour_only_on_a_terminal_without_no_color(daemon: Daemon) -> None:
    config = ("--config", str(daemon.config_path), "status")
    coloured = await asyncio.to_thread(pty_run, *config)
    assert ANSI in coloured and "ready" in coloured
    plain = await asyncio.to_thread(pty_run, *config, NO_COLOR="1")
    assert ANSI not in plain and "ready" in plain


def commands(parser: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                found.append((*path, name))
                found += commands(sub, (*path, name))
    return found


async def test_completion_names_every_command() -> None:
    result = await ctl_run("completion", "bash")
    assert result.code == 0, result
    every = commands(cli._parser())
    assert ("ctl", "deadletters", "purge") in every and ("ctl", "logs") in every
    for path in every:
        assert re.search(rf"\b{path[-1]}\b", result.out), path
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    script = result.out + "\nCOMP_WORDS=(base-worker ctl dead); COMP_CWORD=2; _base_worker\n"
    script += 'echo "${COMPREPLY[*]}"\n'
    answer = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", script], capture_output=True, text=True, timeout=10
    )
    assert answer.stdout.strip() == "deadletters", answer


# The pieces, in process.


def test_the_daemon_does_not_import_the_client_nor_the_client_the_daemon() -> None:
    probe = (
        "import sys, worker.cli; loaded = 'worker.ctl' in sys.modules; import worker.ctl; "
        "print(loaded, sorted(m for m in sys.modules if m in ('worker.http', 'worker.lifecycle')))"
    )
    answer = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert answer.stdout.split("\n")[0] == "False []", answer


async def test_a_key_no_header_can_carry_is_an_error_that_does_not_show_it(
    dead_letter_worker: tuple[str, list[Any]],
) -> None:
    key = "first-half-of-the-key\nsecond-half-of-the-key"
    target = ctl.target_from_url(dead_letter_worker[0], {"BASE_WORKER_KEY": key})
    async with aiohttp.ClientSession() as session:
        client = ctl.Client(target, session)
        for ask in (client.call("GET", "/deadletters"), client.stream("/deadletters").__aenter__()):
            with pytest.raises(ctl.CtlError) as refused:
                await ask
            assert refused.value.code == ctl.ERROR, refused.value
            assert "half-of-the-key" not in refused.value.message


def test_the_address_of_a_wildcard_listener_is_the_loopback() -> None:
    for host, url in (("0.0.0.0", "http://127.0.0.1:3100"), ("::", "http://[::1]:3100")):
        target = ctl.target_from_config(make_config(http={"host": host, "port": 3100}), None)
        assert str(target) == url
        assert AUTH_KEY not in repr(target)
    target = ctl.target_from_config(make_config(http={"host": "10.1.2.3", "port": 3100}), None)
    assert str(target) == "http://10.1.2.3:3100"
    with pytest.raises(ctl.CtlError) as refused:
        ctl.target_from_config(make_config(http={"port": 0}), None)
    assert refused.value.code == ctl.USAGE


def test_durations_read_like_an_uptime() -> None:
    assert ctl.duration(0) == "0s"
    assert ctl.duration(59.9) == "59s"
    assert ctl.duration(61) == "1m 1s"
    assert ctl.duration(7200) == "2h"
    assert ctl.duration(90061) == "1d 1h"


def test_the_status_screen_shows_what_the_health_has() -> None:
    health: dict[str, Any] = {
        "status": "draining",
        "group": "g",
        "contract": 2,
        "slots": {"used": 3, "available": 0, "limit": 4, "queue": 7},
        "webhooks": {"pending": 5, "dead": 2},
        "services": [{"name": "browser", "state": "up"}, {"name": "db", "state": "down"}],
        "loadBalancer": {
            "inbound": {"port": 3001, "connections": 1},
            "enabled": True,
            "url": "wss://lb.test/ws",
            "connected": False,
            "lastError": "refused",
        },
        "system": {"uptime": 3725.0},
        "version": "9.9",
    }
    target = ctl.target_from_url("http://127.0.0.1:1", {"BASE_WORKER_KEY": "k"})
    rows = screen(ctl.status_screen(health, target, ctl.Paint(False)))
    assert rows == {
        "status": "draining",
        "worker": "http://127.0.0.1:1  group g, contract 2",
        "slots": "3/4 used",
        "queue": "7 waiting",
        "webhooks": "5 pending",
        "dead letters": "2",
        "load balancer": (
            "inbound :3001, 1 connected; outbound wss://lb.test/ws disconnected (refused)"
        ),
        "services": "browser up, db down",
        "version": "9.9",
        "uptime": "1h 2m",
    }
    coloured = ctl.status_screen(health, target, ctl.Paint(True))
    assert "\033[31mdraining\033[0m" in coloured and "\033[32mup\033[0m" in coloured
    # Colour codes do not shift the columns.
    values = {
        re.sub(r"\033\[\d+m", "", line).index(value)
        for line, value in zip(coloured.splitlines(), rows.values(), strict=True)
    }
    assert len(values) == 1  # every value starts in one column


def test_dead_letters_are_read_from_webhooks_dead() -> None:
    assert ctl.dead_letter_count({"webhooks": {"pending": 0}}) is None
    assert ctl.dead_letter_count({"webhooks": {"pending": 0, "dead": 3}}) == 3
    assert ctl.dead_letter_count({"webhooks": {"dead": True}}) is None
