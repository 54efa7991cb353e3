"""Services (`@service`, Andera's defineService): started in order before the worker serves,
stopped in reverse after the drain, restarted when they ask, and reported everywhere a balancer
looks; a worker with a service down is `degraded`."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import unused_port

from tests.conftest import AUTH, LB_KEY, ROOT, Worker, task, wait_for
from tests.daemon import Daemon, health, poll, post_task, write_config

StartWorker = Callable[..., Awaitable[Worker]]
HERE = Path(__file__).parent / "functions"
OK, FLAKY, BROKEN = (str(HERE / f"services_{n}.py") for n in ("ok", "flaky", "broken"))


async def detailed(client: Any) -> dict[str, Any]:
    async with client.get("/health", headers=AUTH) as response:
        body: dict[str, Any] = await response.json()
        return body


async def ready_status(client: Any) -> tuple[int, str]:
    async with client.get("/ready") as response:
        return response.status, (await response.json())["status"]


async def first_status(port: int) -> dict[str, Any]:
    """The first status message a balancer gets on the inbound websocket."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://127.0.0.1:{port}/", protocols=(LB_KEY,)) as ws,
    ):
        message: dict[str, Any] = json.loads((await ws.receive()).data)
        return message


def routable(status_message: dict[str, Any]) -> bool:
    """The Andera balancer's rule: ready, a free slot, and every service up."""
    services = status_message.get("services", [])
    return (
        status_message["status"] == "ready"
        and status_message["slots"]["available"] > 0
        and all(s["state"] == "up" for s in services)
    )


async def test_services_start_in_order_and_functions_reach_them(worker_app: StartWorker) -> None:
    client, running = await worker_app(worker={"functions": [OK]})
    module = running.registry.services["first"].factory.__globals__
    assert module["EVENTS"][-2:] == ["first up", "second up"]
    assert (await detailed(client))["services"] == [
        {"name": "first", "state": "up", "status": {"pool": 3}},
        {"name": "second", "state": "up", "status": "warm"},
    ]
    assert await ready_status(client) == (200, "ready")
    response = await client.post("/task", json=task("uses_services"), headers=AUTH)
    assert (await response.json())["result"] == {"first": {"pool": 3}, "second": "warm"}


async def test_a_service_that_fails_once_is_restarted_and_the_worker_recovers(
    worker_app: StartWorker,
) -> None:
    client, running = await worker_app(worker={"functions": [FLAKY]})
    starts = running.registry.services["flaky"].factory.__globals__["STARTS"]
    services = (await detailed(client))["services"]
    assert starts["flaky"] == 1  # its restart waits a second
    assert services[0]["state"] == "restarting"
    assert "the pool is not there yet" in services[0]["status"]
    assert await ready_status(client) == (503, "degraded")
    refused = await client.post("/task", json=task("noop"), headers=AUTH)
    assert refused.status == 503
    await wait_for(lambda: running.slots.status == "ready", timeout=10)
    assert (await detailed(client))["services"] == [
        {"name": "flaky", "state": "up", "status": "started on attempt 2"}
    ]
    assert await ready_status(client) == (200, "ready")
    assert (await client.post("/task", json=task("noop"), headers=AUTH)).status == 200


async def test_a_service_down_leaves_the_worker_up_but_degraded(worker_app: StartWorker) -> None:
    client, _ = await worker_app(worker={"functions": [BROKEN], "service_start_timeout": 0.3})
    services = {s["name"]: s for s in (await detailed(client))["services"]}
    assert services["broken"]["state"] == "down"
    assert services["broken"]["status"] == "RuntimeError: no licence for the browser"
    assert services["hangs"]["state"] == "down"
    assert "did not start within 0.3s" in services["hangs"]["status"]
    assert await ready_status(client) == (503, "degraded")
    refused = await client.post("/task", json=task("noop"), headers=AUTH)
    assert (await refused.json())["error"] == "Worker is degraded: a required service is down"


async def test_a_balancer_sees_a_worker_with_a_service_down_as_not_routable(
    worker_app: StartWorker,
) -> None:
    port = unused_port()
    client, _ = await worker_app(
        worker={"functions": [BROKEN], "service_start_timeout": 0.3},
        load_balancer={"websocket_port": port},
    )
    message = await first_status(port)
    assert {s["name"]: s["state"] for s in message["services"]} == {
        "broken": "down",
        "hangs": "down",
    }
    assert routable(message) is False
    body = await detailed(client)
    assert routable(body) is False


async def test_a_healthy_worker_is_routable_by_the_same_rule(worker_app: StartWorker) -> None:
    port = unused_port()
    await worker_app(worker={"functions": [OK]}, load_balancer={"websocket_port": port})
    message = await first_status(port)
    assert [s["state"] for s in message["services"]] == ["up", "up"]
    assert routable(message) is True


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    started = Daemon(tmp_path, worker={"functions": [OK]})
    yield started
    await started.stop()


@pytest.mark.timeout(60)
async def test_services_stop_in_reverse_after_tasks_in_flight_finished(
    daemon: Daemon, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    await daemon.start(env={"SERVICE_MARKS": str(marks)})
    await daemon.wait_ready()
    async with aiohttp.ClientSession() as session:
        body = task("uses_services", input={"seconds": 1})
        answer = asyncio.create_task(post_task(session, daemon, body))

        async def running() -> bool:
            return bool((await health(session, daemon))["slots"]["used"] == 1)

        await poll(running)
        daemon.signal(signal.SIGTERM)
        status, _ = await answer
    assert status == 200
    assert await daemon.wait_exit() == 0
    assert marks.read_text().splitlines() == [
        "first up",
        "second up",
        "task done",
        "second down",
        "first down",
    ]
    events = [json.loads(line)["event"] for line in daemon.log_events()]
    assert events.count("service started") == 2 and events.count("service stopped") == 2


@pytest.mark.timeout(60)
async def test_a_hanging_service_start_extends_systemds_timeout_then_counts_as_down(
    tmp_path: Path,
) -> None:
    daemon = Daemon(tmp_path, worker={"functions": [BROKEN], "service_start_timeout": 0.5})
    try:
        await daemon.start()
        await daemon.wait_ready()
        fields = daemon.fields()
        extend = [f for f in fields if f.startswith("EXTEND_TIMEOUT_USEC=")]
        assert extend and fields.index(extend[0]) < fields.index("READY=1")
        assert any(f.startswith("STATUS=degraded") for f in fields)
    finally:
        await daemon.stop()


def test_check_lists_the_services_too(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    write_config(path, worker={"functions": [OK]})
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--check", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["uses_services", "service first", "service second"]
