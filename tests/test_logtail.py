"""GET /logs against a real server whose logging pipeline writes to the runtime's buffer."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import structlog

from tests.conftest import AUTH, LB_KEY, Worker, task, wait_for
from worker.logs import LogBuffer, Logging
from worker.logtail import ALIVE_CHECK, Follower

StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def logged_worker(worker_app: StartWorker) -> AsyncIterator[StartWorker]:
    """Like worker_app, with the daemon's logging pipeline applied to the runtime's buffer;
    structlog and the standard library's root logger are restored afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    access = logging.getLogger("aiohttp.access")
    saved_access = access.level

    async def start(**sections: dict[str, Any]) -> Worker:
        client, runtime = await worker_app(**sections)
        runtime.logs.resize(runtime.config.logging.max_lines)
        pipeline = Logging(runtime.logs, io.StringIO())
        pipeline.configure("info", "console", runtime.config.secrets(), environ={})
        return client, runtime

    yield start
    structlog.configure(**saved)
    root.handlers, _ = saved_root
    root.setLevel(saved_root[1])
    access.setLevel(saved_access)


async def get_logs(client: Any, query: str = "", **headers: str) -> Any:
    async with client.get(f"/logs{query}", headers=headers or AUTH) as resp:
        return resp.status, await resp.json()


async def test_max_lines_keeps_exactly_the_last_lines(logged_worker: StartWorker) -> None:
    client, _ = await logged_worker(logging={"max_lines": 50})
    log = structlog.get_logger("test")
    for number in range(80):
        log.info("numbered", n=number)
    status, body = await get_logs(client)
    assert status == 200
    assert [int(re.search(r"n=(\d+)", line)[1]) for line in body["logs"]] == list(range(30, 80))  # type: ignore[index]
    status, body = await get_logs(client, "?lines=3", **{"x-lb-auth": LB_KEY})
    assert status == 200
    assert [line.split("n=")[1] for line in body["logs"]] == ["77", "78", "79"]
    status, body = await get_logs(client, "?lines=0")
    assert body == {"logs": []}


async def test_bad_lines_and_missing_credentials_are_refused(logged_worker: StartWorker) -> None:
    client, _ = await logged_worker()
    for query in ("?lines=abc", "?lines=-1", "?lines=1.5", "?follow=maybe"):
        status, body = await get_logs(client, query)
        assert status == 400, query
        assert body["success"] is False
        assert body["details"]
    async with client.get("/logs") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    async with client.get("/logs", headers={"Authorization": LB_KEY}) as resp:
        assert resp.status == 401  # each key in its own header


async def test_follow_streams_lines_written_after_the_request(
    logged_worker: StartWorker,
) -> None:
    client, runtime = await logged_worker()
    log = structlog.get_logger("test")
    log.info("before the follow")
    async with client.get("/logs?follow=1", headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        log.info("after the follow", marker="first-after")
        async with asyncio.timeout(5):
            line = (await resp.content.readline()).decode()
        assert "first-after" in line
        # A task's own log line and the standard library's records arrive too.
        async with client.post("/task", json=task("log_line", input={"text": "t1"}), headers=AUTH):
            pass
        logging.getLogger("aiohttp.server").warning("stdlib record reaches the buffer")
        seen = []
        async with asyncio.timeout(5):
            while not any("stdlib record" in text for text in seen):
                seen.append((await resp.content.readline()).decode())
        assert any("function says" in text and "text=t1" in text for text in seen)
        assert not any("before the follow" in text for text in [line, *seen])
    assert "before the follow" in runtime.logs.tail()[0]


async def test_a_follow_whose_client_leaves_while_nothing_is_logged_ends(
    logged_worker: StartWorker,
) -> None:
    """Its handler notices at its next alive check and stops following the buffer."""
    client, runtime = await logged_worker()
    listening = len(runtime.logs._listeners)
    resp = await client.get("/logs?follow=1&lines=0", headers=AUTH)
    assert resp.status == 200
    await wait_for(lambda: len(runtime.logs._listeners) == listening + 1)
    resp.close()  # the connection with it
    await wait_for(lambda: len(runtime.logs._listeners) == listening, timeout=ALIVE_CHECK + 10)


async def test_a_follower_that_falls_behind_loses_lines_and_is_told() -> None:
    buffer = LogBuffer(100)
    follower = Follower(buffer, capacity=3)
    for number in range(5):
        buffer.append(f"line {number}")  # never waits, however slow the reader
    assert await follower.take(1.0) == [
        "line 0",
        "line 1",
        "line 2",
        "... 2 lines dropped (reader too slow)",
    ]
    buffer.append("line 5")
    assert await follower.take(1.0) == ["line 5"]
    follower.close()
    buffer.append("line 6")
    assert await follower.take(1.0) == []


async def test_authorization_values_never_reach_the_logs(logged_worker: StartWorker) -> None:
    client, _ = await logged_worker()
    leaked = "Bearer not-a-key-but-secret-0042"
    async with client.post("/task", json=task("hello"), headers={"Authorization": leaked}) as r:
        assert r.status == 401
    async with client.post("/task", json=task("hello"), headers=AUTH) as resp:
        assert resp.status == 200
    said = "Authorization: Bearer function-token-77"
    async with client.post("/task", json=task("log_line", input={"text": said}), headers=AUTH):
        pass
    logging.getLogger("aiohttp.server").warning("headers {'Authorization': 'lib-token-55'}")
    _, body = await get_logs(client)
    text = "\n".join(body["logs"])
    assert "function says" in text
    assert "headers {'Authorization': '***'}" in text
    for secret in ("not-a-key-but-secret-0042", AUTH["Authorization"], "function-token-77"):
        assert secret not in text
    assert "lib-token-55" not in text
