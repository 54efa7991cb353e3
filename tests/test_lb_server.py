"""The inbound websocket, as the Andera load balancer uses it: a fake balancer (an aiohttp
websocket client) on loopback against a real worker."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import unused_port

from tests.conftest import AUTH, LB_KEY, Worker, task, wait_for

StartWorker = Callable[..., Awaitable[Worker]]
SLOT_KEYS = {"used", "available", "limit", "queue"}


class FakeAndera:
    """One balancer's websocket to the worker, recording every message with its arrival time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.closed_with: int | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type == WSMsgType.TEXT:
                self.received.append((time.monotonic(), json.loads(message.data)))
        self.closed_with = self.ws.close_code

    def statuses(self) -> list[tuple[float, dict[str, Any]]]:
        return [(at, m) for at, m in self.received if "system" in m]

    async def reaches(self, predicate: Callable[[dict[str, Any]], bool], since: float) -> float:
        """Seconds from `since` until a status message matching `predicate` arrived."""

        def matching() -> list[float]:
            return [at for at, m in self.statuses() if at >= since and predicate(m)]

        await wait_for(lambda: bool(matching()), timeout=2.0)
        return min(matching()) - since

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def serving(worker_app: StartWorker, **sections: dict[str, Any]) -> tuple[Worker, str]:
    port = unused_port()
    worker = await worker_app(load_balancer={"websocket_port": port}, **sections)
    return worker, f"ws://127.0.0.1:{port}/"


async def test_no_or_wrong_key_is_opened_then_closed_with_4001(
    worker_app: StartWorker,
    session: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    (client, _), url = await serving(worker_app)
    wrong = "wrong-key-that-must-not-be-logged"
    for protocols in [(), (wrong,), (wrong, "another")]:
        async with session.ws_connect(url, protocols=protocols) as ws:
            assert ws.protocol is None
            first = await asyncio.wait_for(ws.receive(), 2.0)
            assert first.type == WSMsgType.CLOSE  # nothing before the close
            assert first.data == 4001
    response = await client.get("/health", headers={"x-lb-auth": LB_KEY})
    assert (await response.json())["loadBalancer"]["inbound"]["refused"] == 3
    assert wrong not in capsys.readouterr().out + caplog.text


async def test_empty_lb_key_refuses_everyone(
    worker_app: StartWorker, session: aiohttp.ClientSession
) -> None:
    _, url = await serving(worker_app, auth={"lb_auth_key": ""})
    async with session.ws_connect(url, protocols=("",)) as ws:
        first = await asyncio.wait_for(ws.receive(), 2.0)
        assert (first.type, first.data) == (WSMsgType.CLOSE, 4001)


async def test_accepted_key_is_echoed_and_ping_answered(
    worker_app: StartWorker, session: aiohttp.ClientSession
) -> None:
    (client, _), url = await serving(worker_app)
    async with session.ws_connect(url, protocols=(LB_KEY,)) as ws:
        assert ws.protocol == LB_KEY
        hello = await asyncio.wait_for(ws.receive_json(), 2.0)
        assert set(hello) == {"status", "slots", "system", "services"}
        assert set(hello["slots"]) == SLOT_KEYS
        assert hello["services"] == []
        await ws.send_str("ping")
        while True:  # a periodic status may come first
            reply = await asyncio.wait_for(ws.receive_json(), 2.0)
            if "system" not in reply:
                break
        assert reply == {
            "status": "ready",
            "slots": {"used": 0, "available": 10, "limit": 10, "queue": 0},
        }
        response = await client.get("/health", headers={"x-lb-auth": LB_KEY})
        assert (await response.json())["loadBalancer"]["inbound"]["connections"] == 1


async def test_status_every_second(worker_app: StartWorker, session: aiohttp.ClientSession) -> None:
    _, url = await serving(worker_app)
    async with session.ws_connect(url, protocols=(LB_KEY,)) as ws:
        balancer = FakeAndera(ws)
        await wait_for(lambda: len(balancer.statuses()) >= 3, timeout=4.0)
        times = [at for at, _ in balancer.statuses()]
        # STATUS_EVERY is 1.0 s; either arrival may lag by a loaded loop, so the bounds are
        # loose on both sides, still far from "every loop turn" and from "every few seconds".
        assert 0.5 < times[2] - times[1] < 1.5
        await balancer.close()


# A change must reach the balancers before the next periodic status: STATUS_EVERY is 1.0 s, so
# arriving within half of it shows the change was pushed on change, not on the period.
ON_CHANGE = 0.5


async def test_changes_reach_every_balancer_before_the_next_periodic_status(
    worker_app: StartWorker, session: aiohttp.ClientSession
) -> None:
    (client, runtime), url = await serving(worker_app)
    balancers = []
    for _ in range(3):
        ws = await session.ws_connect(url, protocols=(LB_KEY,))
        balancers.append(FakeAndera(ws))
    for balancer in balancers:
        await wait_for(lambda b=balancer: len(b.statuses()) >= 1)
    steer = runtime.registry.functions["wait_gate"].handler.__globals__
    name = f"inbound-{uuid.uuid4()}"

    sent = time.monotonic()
    running = asyncio.create_task(
        client.post("/task", json=task("wait_gate", input={"gate": name}), headers=AUTH)
    )
    for balancer in balancers:
        assert await balancer.reaches(lambda m: m["slots"]["used"] == 1, sent) < ON_CHANGE

    sent = time.monotonic()
    steer["gate"](name).set()
    assert (await running).status == 200
    for balancer in balancers:
        assert await balancer.reaches(lambda m: m["slots"]["used"] == 0, sent) < ON_CHANGE

    sent = time.monotonic()
    assert (await client.post("/off", headers=AUTH)).status == 200
    for balancer in balancers:
        assert await balancer.reaches(lambda m: m["status"] == "maintenance", sent) < ON_CHANGE

    sent = time.monotonic()
    runtime.slots.hold("draining")
    for balancer in balancers:
        assert await balancer.reaches(lambda m: m["status"] == "draining", sent) < ON_CHANGE
    for balancer in balancers:
        await balancer.close()


async def test_shutdown_closes_every_balancer_with_going_away(
    worker_app: StartWorker, session: aiohttp.ClientSession
) -> None:
    (client, _), url = await serving(worker_app)
    balancers = [FakeAndera(await session.ws_connect(url, protocols=(LB_KEY,))) for _ in range(2)]
    for balancer in balancers:
        await wait_for(lambda b=balancer: len(b.statuses()) >= 1)
    await client.close()
    for balancer in balancers:
        await wait_for(lambda b=balancer: b.closed_with is not None)
        assert balancer.closed_with == 1001
