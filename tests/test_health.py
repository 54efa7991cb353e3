"""GET /health: the public status and the detailed view the Andera load balancer reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.conftest import AUTH, task, wait_for
from worker import __version__, health

Start = Callable[..., Any]


async def test_public_view_is_only_the_status(worker_app: Start) -> None:
    client, runtime = await worker_app()
    response = await client.get("/health")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {"status": "ready"}
    runtime.slots.hold("draining")
    assert await (await client.get("/health")).json() == {"status": "draining"}


async def test_detailed_view_has_every_field_the_balancer_reads(worker_app: Start) -> None:
    client, _ = await worker_app(
        worker={"group": "gpu", "contract": 2, "slots": 3}, load_balancer={"websocket_port": 0}
    )
    body = await (await client.get("/health", headers=AUTH)).json()
    assert set(body) >= {
        "status",
        "group",
        "contract",
        "websocketPort",
        "functions",
        "services",
        "tags",
        "slots",
        "system",
        "version",
        "loadBalancer",
    }
    assert body["status"] == "ready"
    assert body["group"] == "gpu"
    assert body["contract"] == 2
    assert body["websocketPort"] == 0
    assert body["services"] == []
    assert body["slots"] == {"used": 0, "available": 3, "limit": 3, "queue": 0}
    assert body["version"] == __version__
    assert set(body["system"]) == {"uptime", "cpuLoad", "usedMemoryPercent"}
    assert all(isinstance(v, int | float) for v in body["system"].values())
    assert 0 <= body["system"]["usedMemoryPercent"] <= 100
    assert isinstance(body["loadBalancer"], dict)


async def test_functions_are_listed_with_their_params(worker_app: Start) -> None:
    client, _ = await worker_app()
    body = await (await client.get("/health", headers=AUTH)).json()
    by_name = {f["name"]: f for f in body["functions"]}
    assert set(by_name) >= {"hello", "wait_gate", "typed", "block", "chunks"}
    assert all(set(f) == {"name", "params"} for f in body["functions"])
    assert by_name["hello"]["params"] == {
        "name": {"type": "string", "required": False, "default": "World"}
    }
    assert by_name["typed"]["params"]["text"] == {
        "type": "string",
        "required": True,
        "min": 2,
        "max": 5,
        "pattern": "^[a-z]+$",
    }
    assert by_name["not_json"]["params"] == {}


async def test_tags_are_computed_when_asked(worker_app: Start) -> None:
    client, _ = await worker_app()
    body = await (await client.get("/health", headers=AUTH)).json()
    assert body["tags"]["test-tag"] == "tag-value"  # an async tag
    assert body["tags"]["python"].count(".") == 2  # worker.examples' plain tag
    public = await (await client.get("/health")).json()
    assert "tags" not in public


async def test_slots_follow_running_and_queued_work(worker_app: Start) -> None:
    client, runtime = await worker_app(worker={"slots": 1})
    steer = runtime.registry.functions["wait_gate"].handler.__globals__
    running = asyncio.create_task(
        client.post("/task", json=task("wait_gate", input={"gate": "h"}), headers=AUTH)
    )
    await asyncio.wait_for(steer["started"]("h").wait(), 5)
    queued = asyncio.create_task(
        client.post("/task", json=task("wait_gate", input={"gate": "h"}), headers=AUTH)
    )
    await wait_for(lambda: runtime.slots.state().queue == 1)
    body = await (await client.get("/health", headers=AUTH)).json()
    assert body["slots"] == {"used": 1, "available": 0, "limit": 1, "queue": 1}
    steer["gate"]("h").set()
    assert [r.status for r in await asyncio.gather(running, queued)] == [200, 200]
    body = await (await client.get("/health", headers=AUTH)).json()
    assert body["slots"] == {"used": 0, "available": 1, "limit": 1, "queue": 0}


def test_system_numbers() -> None:
    numbers = health.system()
    assert numbers["uptime"] >= 0
    assert numbers["cpuLoad"] >= 0
    assert 0 < numbers["usedMemoryPercent"] <= 100
