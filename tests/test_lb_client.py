"""The outbound link against fake balancers on loopback: registration, prompt and coalesced
status, pings, back-off and reconnection, and balancers that misbehave."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import AUTH, LB_KEY, Worker, make_config, task, wait_for
from tests.lb_fakes import FakeBalancer, RawServer
from worker import __version__, functions
from worker.lb_client import OutboundClient, Timings
from worker.slots import SlotManager

ADVERTISED = "http://127.0.0.1:39999"
StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def balancer() -> AsyncIterator[FakeBalancer]:
    fake = FakeBalancer(LB_KEY)
    await fake.start()
    yield fake
    await fake.stop()


async def linked(worker_app: StartWorker, url: str, **sections: dict[str, Any]) -> Worker:
    return await worker_app(load_balancer={"url": url, "advertise_url": ADVERTISED}, **sections)


def statuses(fake: FakeBalancer) -> list[tuple[float, dict[str, Any]]]:
    return [(at, m) for at, m in fake.received if m.get("type") == "status"]


def attempts(accepted: list[float]) -> list[float]:
    """Connection attempts from TCP accept times: aiohttp retries a reset connection once at
    once, so accepts less than 50 ms apart are one attempt."""
    found: list[float] = []
    for at in accepted:
        if not found or at - found[-1] > 0.05:
            found.append(at)
    return found


async def lb_health(client: Any) -> dict[str, Any]:
    response = await client.get("/health", headers={"x-lb-auth": LB_KEY})
    assert response.status == 200
    body: dict[str, Any] = (await response.json())["loadBalancer"]
    return body


async def test_registers_then_reports_status(
    worker_app: StartWorker, balancer: FakeBalancer
) -> None:
    client, _ = await linked(worker_app, balancer.url, worker={"group": "gpu", "slots": 3})
    await wait_for(lambda: len(balancer.messages) >= 2)
    first, second = balancer.messages[:2]
    assert first["type"] == "register"
    worker = first["worker"]
    assert worker["url"] == ADVERTISED
    assert worker["group"] == "gpu"
    assert worker["contract"] == 1
    assert worker["status"] == "ready"
    assert worker["version"] == __version__
    assert worker["slots"] == {"used": 0, "available": 3, "limit": 3, "queue": 0}
    assert {
        "name": "hello",
        "params": {"name": {"type": "string", "required": False, "default": "World"}},
    } in worker["functions"]
    assert second["type"] == "status"
    assert set(second) == {"type", "status", "slots", "system", "services"}
    assert set(second["system"]) == {"uptime", "cpuLoad", "usedMemoryPercent"}
    state = await lb_health(client)
    assert state["enabled"] is True
    assert state["connected"] is True
    assert state["url"] == balancer.url
    assert state["reconnects"] == 0


# The outbound link sends a status every Timings.status_every = 10 s even with no change, so
# anything arriving within a second was sent on change (or in answer to the ping), not on the
# period.
ON_CHANGE = 1.0


async def test_changes_and_pings_reach_the_balancer_before_the_next_periodic_status(
    worker_app: StartWorker, balancer: FakeBalancer
) -> None:
    client, runtime = await linked(worker_app, balancer.url)
    await wait_for(lambda: len(statuses(balancer)) >= 1)

    async def reaches(predicate: Callable[[dict[str, Any]], bool], since: float) -> float:
        def arrived() -> bool:
            return any(at >= since and predicate(m) for at, m in statuses(balancer))

        await wait_for(arrived, timeout=2.0)
        return min(at for at, m in statuses(balancer) if at >= since and predicate(m)) - since

    steer = runtime.registry.functions["wait_gate"].handler.__globals__
    name = f"lb-{uuid.uuid4()}"
    sent = time.monotonic()
    running = asyncio.create_task(
        client.post("/task", json=task("wait_gate", input={"gate": name}), headers=AUTH)
    )
    await asyncio.wait_for(steer["started"](name).wait(), 2.0)
    assert await reaches(lambda m: m["slots"]["used"] == 1, sent) < ON_CHANGE

    sent = time.monotonic()
    steer["gate"](name).set()
    assert (await running).status == 200
    assert await reaches(lambda m: m["slots"]["used"] == 0, sent) < ON_CHANGE

    sent = time.monotonic()
    assert (await client.post("/off", headers=AUTH)).status == 200
    assert await reaches(lambda m: m["status"] == "maintenance", sent) < ON_CHANGE
    assert statuses(balancer)[-1][1]["slots"]["available"] == 0

    sent = time.monotonic()
    assert (await client.post("/on", headers=AUTH)).status == 200
    assert await reaches(lambda m: m["status"] == "ready", sent) < ON_CHANGE

    # Draining (the lifecycle sets it at SIGTERM) is pushed at once too.
    sent = time.monotonic()
    runtime.slots.hold("draining")
    assert await reaches(lambda m: m["status"] == "draining", sent) < ON_CHANGE

    count = len(balancer.messages)
    sent = time.monotonic()
    await balancer.send_ping()
    await wait_for(lambda: len(balancer.messages) > count, timeout=2.0)
    reply_at, reply = balancer.received[count]
    assert reply == {
        "status": "draining",
        "slots": {"used": 0, "available": 0, "limit": 10, "queue": 0},
    }
    assert reply_at - sent < ON_CHANGE


async def test_a_burst_of_1000_tasks_is_coalesced(
    worker_app: StartWorker, balancer: FakeBalancer
) -> None:
    client, runtime = await linked(worker_app, balancer.url)
    await wait_for(lambda: len(statuses(balancer)) >= 1)
    before = len(statuses(balancer))
    limit = asyncio.Semaphore(50)

    async def one(index: int) -> int:
        async with limit:
            body = task("hello", input={"name": f"n{index}"})
            response = await client.post("/task", json=body, headers=AUTH)
            await response.read()
            return response.status

    codes = await asyncio.gather(*(one(i) for i in range(1000)))
    assert codes == [200] * 1000

    def settled() -> bool:
        last = statuses(balancer)[-1][1]
        return last["slots"] == {"used": 0, "available": 10, "limit": 10, "queue": 0}

    await wait_for(settled, timeout=2.0)
    sent = len(statuses(balancer)) - before
    assert 1 <= sent < 400, f"{sent} status messages for 2000 slot changes"
    assert runtime.slots.state().used == 0


async def test_balancer_killed_and_restarted(
    worker_app: StartWorker, balancer: FakeBalancer
) -> None:
    client, _ = await linked(worker_app, balancer.url)
    await wait_for(lambda: len(balancer.of_type("register")) == 1)
    outcomes: list[int] = []
    stop = asyncio.Event()

    async def keep_calling() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            response = await client.post("/task", json=task("hello"), headers=AUTH)
            await response.read()
            outcomes.append(response.status)
            await asyncio.sleep(0.01)

    caller = asyncio.create_task(keep_calling())
    await balancer.stop()
    # While it is gone its port hangs up on every attempt, so each attempt is seen and timed.
    refuser = RawServer(balancer.port, hang_up=True)
    await refuser.start()
    try:
        await wait_for(lambda: len(attempts(refuser.accepted)) >= 3, timeout=10)
    finally:
        await refuser.stop()
    tried = attempts(refuser.accepted)
    gaps = [b - a for a, b in itertools.pairwise(tried)]
    # Each wait is 50-100% of a doubling ceiling, so waits never shrink and soon exceed 0.4 s.
    assert gaps[1] >= gaps[0] * 0.9, gaps
    assert gaps[1] >= 0.4, gaps
    state = await lb_health(client)
    assert state["connected"] is False
    assert state["lastError"]
    assert state["reconnects"] >= 3, (state, tried)

    await balancer.start()
    await wait_for(lambda: len(balancer.of_type("register")) == 2, timeout=10)
    await wait_for(lambda: balancer.messages[-1].get("type") == "status")
    assert (await lb_health(client))["connected"] is True
    stop.set()
    await caller
    assert len(outcomes) > 20
    assert set(outcomes) == {200}


async def test_a_handshake_that_never_completes_blocks_nothing(worker_app: StartWorker) -> None:
    stall = RawServer()
    await stall.start()
    try:
        client, _ = await linked(worker_app, stall.url)
        await wait_for(lambda: len(stall.accepted) >= 1)
        began = time.monotonic()
        for _ in range(20):
            response = await client.post("/task", json=task("hello"), headers=AUTH)
            assert response.status == 200
        state = await lb_health(client)
        assert time.monotonic() - began < 2.0
        assert state["connected"] is False
    finally:
        await stall.stop()


async def test_handshake_timeout_gives_up_and_retries() -> None:
    stall = RawServer()
    await stall.start()
    cfg = make_config(load_balancer={"url": stall.url})
    slots = SlotManager(cfg.worker.slots, cfg.worker.max_queue)
    registry = functions.load(cfg.worker.functions)
    timings = Timings(handshake_timeout=0.3, backoff_first=0.05)
    link = OutboundClient(slots, registry, cfg, list, timings)
    await link.start()
    try:
        await wait_for(lambda: stall.ended >= 2, timeout=5)
        assert link.last_error == "handshake timed out after 0.3s"
        assert link.reconnects >= 1
        assert link.connected is False
    finally:
        await link.stop(0.0)
        await stall.stop()


@pytest.mark.parametrize("behaviour", ["garbage", "close"])
async def test_a_misbehaving_balancer_blocks_nothing(
    worker_app: StartWorker, behaviour: Any
) -> None:
    fake = FakeBalancer(LB_KEY, behaviour=behaviour)
    await fake.start()
    try:
        client, _ = await linked(worker_app, fake.url)
        await wait_for(lambda: len(fake.handshakes) >= 3, timeout=10)
        for _ in range(10):
            response = await client.post("/task", json=task("hello"), headers=AUTH)
            assert response.status == 200
        state = await lb_health(client)
        assert state["reconnects"] >= 2
        assert state["lastError"]
        gaps = [b - a for a, b in zip(fake.handshakes, fake.handshakes[1:], strict=False)]
        assert gaps[-1] >= 0.2, gaps  # backing off, not spinning
    finally:
        await fake.stop()


async def test_wrong_key_is_refused_and_retried(worker_app: StartWorker) -> None:
    fake = FakeBalancer("another-key")
    await fake.start()
    try:
        client, _ = await linked(worker_app, fake.url)
        await wait_for(lambda: fake.refused >= 2, timeout=5)
        state = await lb_health(client)
        assert state["lastError"].startswith("handshake refused: HTTP 401")
    finally:
        await fake.stop()


async def test_reload_follows_the_url_and_re_registers(
    worker_app: StartWorker, balancer: FakeBalancer
) -> None:
    client, runtime = await linked(worker_app, balancer.url)
    await wait_for(lambda: len(balancer.of_type("register")) == 1)

    # Same balancer, new group: registered again on the same link.
    renamed = dataclasses.replace(
        runtime.config, worker=dataclasses.replace(runtime.config.worker, group="blue")
    )
    runtime.apply(renamed)
    await wait_for(lambda: len(balancer.of_type("register")) == 2)
    assert balancer.of_type("register")[-1]["worker"]["group"] == "blue"
    assert len(balancer.handshakes) == 1

    other = FakeBalancer(LB_KEY)
    await other.start()
    try:
        moved = dataclasses.replace(
            renamed, load_balancer=dataclasses.replace(renamed.load_balancer, url=other.url)
        )
        runtime.apply(moved)
        await wait_for(lambda: len(other.of_type("register")) == 1, timeout=2)
        await wait_for(lambda: balancer.close_codes == [1000])
        assert (await lb_health(client))["url"] == other.url

        off = dataclasses.replace(
            moved, load_balancer=dataclasses.replace(moved.load_balancer, url="")
        )
        runtime.apply(off)
        await wait_for(lambda: other.close_codes == [1000])
        state = await lb_health(client)
        assert state["enabled"] is False
        assert state["connected"] is False
    finally:
        await other.stop()


async def test_shutdown_closes_the_link_with_going_away(
    worker_app: StartWorker, balancer: FakeBalancer
) -> None:
    client, _ = await linked(worker_app, balancer.url)
    await wait_for(lambda: len(statuses(balancer)) >= 1)
    await client.close()
    await wait_for(lambda: balancer.close_codes == [1001])


async def test_off_when_no_url(worker_app: StartWorker) -> None:
    client, _ = await worker_app()
    state = await lb_health(client)
    assert state["enabled"] is False
    assert state["connected"] is False
    assert state["inbound"]["port"] == 0
