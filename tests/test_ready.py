"""GET /ready for plain load balancers, and drain grace, on a real server and a real daemon."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AUTH, Worker, task
from tests.daemon import Daemon, post_task

StartWorker = Callable[..., Awaitable[Worker]]


async def ready(client: Any) -> tuple[int, dict[str, Any], str | None]:
    async with client.get("/ready") as response:
        return response.status, await response.json(), response.headers.get("Retry-After")


async def test_ready_follows_ready_maintenance_ready_draining(worker_app: StartWorker) -> None:
    client, running = await worker_app()
    assert await ready(client) == (200, {"status": "ready"}, None)  # no key needed
    assert (await client.post("/off", headers=AUTH)).status == 200
    assert await ready(client) == (503, {"status": "maintenance"}, "5")
    assert (await client.post("/on", headers=AUTH)).status == 200
    assert await ready(client) == (200, {"status": "ready"}, None)
    running.slots.hold("draining")
    assert await ready(client) == (503, {"status": "draining"}, "5")


async def test_ready_says_starting_and_degraded_and_draining_wins(
    worker_app: StartWorker,
) -> None:
    client, running = await worker_app()
    running.slots.hold("degraded")
    assert await ready(client) == (503, {"status": "degraded"}, "5")
    response = await client.post("/task", json=task("hello"), headers=AUTH)
    assert response.status == 503
    assert (await response.json())["error"] == "Worker is degraded: a required service is down"
    running.slots.hold("starting")
    assert (await ready(client))[1] == {"status": "starting"}
    running.slots.hold("draining")
    assert (await ready(client))[1] == {"status": "draining"}
    running.slots.hold("draining", False)
    running.slots.hold("starting", False)
    running.slots.hold("degraded", False)
    assert (await ready(client))[0] == 200


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    started = Daemon(tmp_path, worker={"drain_grace": 2.0, "drain_timeout": 20.0})
    await started.start()
    await started.wait_ready()
    yield started
    await started.stop()


@pytest.mark.timeout(60)
async def test_drain_grace_takes_tasks_for_a_while_though_ready_says_draining(
    daemon: Daemon,
) -> None:
    async with aiohttp.ClientSession() as session:
        # Work that outlives the grace keeps the daemon draining, so the last refusal can be seen.
        long = asyncio.create_task(post_task(session, daemon, task("sleep", input={"seconds": 4})))
        daemon.signal(signal.SIGTERM)
        await daemon.wait_notify(lambda f: f == "STOPPING=1")
        async with session.get(f"{daemon.url}/ready") as response:
            assert (response.status, await response.json()) == (503, {"status": "draining"})
        await asyncio.sleep(0.5)  # the delay under test: half a second into a 2 s grace
        status, body = await post_task(session, daemon, task("hello"))
        assert (status, body.get("result")) == (200, {"message": "Hello World!"})
        await asyncio.sleep(2.0)  # the delay under test: half a second after the grace
        status, body = await post_task(session, daemon, task("hello"))
        assert (status, body["error"]) == (503, "Worker is draining for shutdown")
        assert (await long)[0] == 200
    assert await daemon.wait_exit() == 0
    last = json.loads(daemon.log_events()[-1])
    assert (last["event"], last["completed"], last["cancelled"]) == ("stopped", 2, 0)
