"""What an unauthenticated client can do to the log, and what masking does to it, tried on a real
daemon: a short key leaves the words around it alone, and floods of refused credentials,
malformed requests and refused websockets cost a line a second per address, not a line each."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import unused_port

from tests.conftest import task
from tests.daemon import Daemon, events, poll, start_daemon

pytestmark = pytest.mark.timeout(60)


async def test_a_one_letter_key_is_masked_without_damaging_the_log(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    ws_port = unused_port()
    daemon = await start_daemon(
        daemons,
        tmp_path,
        auth={"auth_key": "k", "lb_auth_key": "q"},
        load_balancer={"websocket_port": ws_port},
    )
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": "k"}
        async with session.post(f"{daemon.url}/task", json=task("hello"), headers=headers) as r:
            assert r.status == 200
    await poll(lambda: _true(bool(events(daemon, "task"))))
    text = "\n".join(daemon.output)
    assert "load balancer websocket listening" in text
    summary = events(daemon, "task")[0]
    assert summary["task_id"] and summary["function"] == "hello"
    assert "***" not in text.replace('"***"', "")  # nothing but whole values was masked
    weak = [e["event"] for e in map(json.loads, daemon.log_events()) if "weak key" in e["event"]]
    assert weak == [
        "auth.auth_key is shorter than 16 characters: a weak key",
        "auth.lb_auth_key is shorter than 16 characters: a weak key",
    ]


async def test_refused_credentials_cost_a_line_a_second_per_address(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = await start_daemon(daemons, tmp_path)
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:

        async def refused() -> int:
            headers = {"Authorization": "wrong"}
            async with session.post(f"{daemon.url}/task", json=task("hello"), headers=headers) as r:
                return r.status

        assert set(await asyncio.gather(*(refused() for _ in range(300)))) == {401}
        flood_seconds = time.monotonic() - began

        # Knock again until the next line comes, which tells how many were held back.
        async def counted() -> bool:
            await refused()
            return any(e["suppressed"] > 0 for e in events(daemon, "unauthorized request"))

        await poll(counted)
    lines = events(daemon, "unauthorized request")
    assert len(lines) <= flood_seconds + 3, len(lines)
    assert lines[0]["peer"] == "127.0.0.1" and lines[0]["level"] == "warning"
    assert sum(e["suppressed"] for e in lines) + len(lines) >= 300


async def test_malformed_requests_are_warnings_without_traceback_and_throttled(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = await start_daemon(daemons, tmp_path)
    began = time.monotonic()

    async def malformed() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n")
        await writer.drain()
        await reader.read()  # the daemon answers 400 and closes
        writer.close()

    await asyncio.gather(*(malformed() for _ in range(100)))
    flood_seconds = time.monotonic() - began
    await poll(lambda: _true(bool(events(daemon, "malformed request"))))
    lines = events(daemon, "malformed request")
    assert 1 <= len(lines) <= flood_seconds + 2, len(lines)
    assert {line["level"] for line in lines} == {"warning"}
    assert lines[0]["peer"] == "127.0.0.1"
    assert not any("Traceback" in line for line in daemon.output)
    assert not events(daemon, "Error handling request from 127.0.0.1")


async def test_refused_websockets_are_throttled_too(daemons: list[Daemon], tmp_path: Path) -> None:
    ws_port = unused_port()
    daemon = await start_daemon(daemons, tmp_path, load_balancer={"websocket_port": ws_port})
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            async with session.ws_connect(f"ws://127.0.0.1:{ws_port}/", protocols=("no",)) as ws:
                await ws.receive()
                assert ws.close_code == 4001
    flood_seconds = time.monotonic() - began
    lines = [
        e
        for e in map(json.loads, daemon.log_events())
        if e["event"].startswith("load balancer websocket refused")
    ]
    assert 1 <= len(lines) <= flood_seconds + 2, len(lines)


async def _true(value: bool) -> bool:
    return value
