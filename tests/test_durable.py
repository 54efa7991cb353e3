"""Durable webhook tasks, tried as an operator would: real daemons with a state directory, a real
SQLite journal, real SIGKILL and SIGTERM, and a receiver on loopback. Every accepted task ends
delivered or dead, never lost; a result whose delivery was cut short by a kill may arrive twice,
always with the same X-Task-Id and body, so that receivers de-duplicate on it."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sqlite3
import struct
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, unused_port

from tests.conftest import AUTH, AUTH_KEY, Worker, task, wait_for
from tests.daemon import Daemon, poll

pytestmark = pytest.mark.timeout(120)
DURABLE = str(Path(__file__).parent / "functions" / "durable.py")
StartWorker = Callable[..., Awaitable[Worker]]


class Receiver:
    """Takes webhook deliveries (answering `status`), keyed by X-Task-Id."""

    def __init__(self) -> None:
        self.status = 200
        self.bodies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if self.status == 200:
            self.bodies[request.headers["X-Task-Id"]].append(await request.json())
        return web.Response(status=self.status)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hook"))


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Receiver:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    found.server = await aiohttp_server(app, host="127.0.0.1")
    return found


class Fleet:
    """Daemons that share one state directory and one port, one after the other."""

    def __init__(self, tmp: Path, **sections: dict[str, Any]) -> None:
        self.tmp = tmp
        self.port = unused_port()
        self.sections = sections
        self.every: list[Daemon] = []

    async def start(self) -> Daemon:
        home = self.tmp / f"run{len(self.every)}"
        home.mkdir()
        worker = {"functions": [DURABLE], "state_dir": str(self.tmp / "state")}
        worker.update(self.sections.get("worker", {}))
        others = {k: v for k, v in self.sections.items() if k != "worker"}
        daemon = Daemon(home, http={"port": self.port}, worker=worker, **others)
        self.every.append(daemon)
        await daemon.start()
        await daemon.wait_ready()
        return daemon

    async def stop(self) -> None:
        for daemon in self.every:
            await daemon.stop()


@pytest.fixture
async def fleets(tmp_path: Path) -> AsyncIterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(**sections: dict[str, Any]) -> Fleet:
        fleet = Fleet(tmp_path / f"fleet{len(made)}", **sections)
        fleet.tmp.mkdir()
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        await fleet.stop()


async def submit(
    session: aiohttp.ClientSession,
    daemon: Daemon,
    function: str,
    url: str,
    seconds: float = 0.3,
    key: str | None = None,
) -> dict[str, Any]:
    body = task(function, input={"seconds": seconds}, mode="webhook", webhook={"url": url})
    headers = {**AUTH, **({"Idempotency-Key": key} if key else {})}
    async with session.post(f"{daemon.url}/task", json=body, headers=headers) as response:
        assert response.status == 202, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


def kill(daemon: Daemon) -> None:
    daemon.signal(signal.SIGKILL)


async def all_delivered(receiver: Receiver, task_ids: set[str]) -> None:
    async def check() -> bool:
        return task_ids <= set(receiver.bodies)

    await poll(check, timeout=60)


def assert_each_once_or_resent_alike(receiver: Receiver, task_ids: set[str]) -> None:
    assert set(receiver.bodies) == task_ids
    for task_id, bodies in receiver.bodies.items():
        assert all(body == bodies[0] for body in bodies), (task_id, bodies)
        assert bodies[0]["task_id"] == task_id


@pytest.mark.parametrize(("function", "idempotent"), [("nap", False), ("nap_again", True)])
async def test_a_kill_9_loses_no_accepted_task(
    fleets: Callable[..., Fleet], receiver: Receiver, function: str, idempotent: bool
) -> None:
    fleet = fleets(worker={"slots": 2})
    first = await fleet.start()
    async with aiohttp.ClientSession() as session:
        ids = {(await submit(session, first, function, receiver.url))["task_id"] for _ in range(30)}

        async def busy() -> bool:
            async with session.get(f"{first.url}/health", headers=AUTH) as response:
                slots = (await response.json())["slots"]
                return bool(slots["used"] == 2 and slots["queue"] >= 20)

        await poll(busy)
        kill(first)
        await first.wait_exit()
        await fleet.start()
        await all_delivered(receiver, ids)
    assert_each_once_or_resent_alike(receiver, ids)
    outcomes = [bodies[0] for bodies in receiver.bodies.values()]
    interrupted = [b for b in outcomes if not b["success"]]
    if idempotent:
        assert interrupted == []
    else:
        assert len(interrupted) <= 2  # at most the two that were running
        assert all(b["error"].startswith("interrupted") for b in interrupted)
    assert all(b["result"]["napped"] == 0.3 for b in outcomes if b["success"])


async def test_kills_at_random_moments_lose_nothing(
    fleets: Callable[..., Fleet], receiver: Receiver
) -> None:
    fleet = fleets(worker={"slots": 2})
    ids: set[str] = set()
    chance = random.Random(2026)
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            daemon = await fleet.start()
            for _ in range(4):
                ids.add((await submit(session, daemon, "nap", receiver.url, 0.05))["task_id"])
            await asyncio.sleep(chance.uniform(0, 0.3))  # the moment of the kill, at random
            kill(daemon)
            await daemon.wait_exit()
        await fleet.start()
        await all_delivered(receiver, ids)
    assert_each_once_or_resent_alike(receiver, ids)
    assert len(ids) == 80


async def test_dead_letters_are_listed_redelivered_survive_a_restart_and_are_purged(
    fleets: Callable[..., Fleet], receiver: Receiver
) -> None:
    fleet = fleets(webhook={"max_retries": 1, "retry_delay": 0.01})
    daemon = await fleet.start()
    receiver.status = 503  # down through every retry
    async with aiohttp.ClientSession() as session:
        ids = [(await submit(session, daemon, "nap", receiver.url, 0))["task_id"] for _ in range(3)]

        async def letters(d: Daemon) -> dict[str, Any]:
            async with session.get(f"{d.url}/deadletters", headers=AUTH) as response:
                assert response.status == 200
                found: dict[str, Any] = await response.json()
                return found

        async def all_dead() -> bool:
            return bool((await letters(daemon))["count"] == 3)

        await poll(all_dead)
        listed = (await letters(daemon))["deadletters"]
        assert {d["task_id"] for d in listed} == set(ids)
        assert {(d["function"], d["attempts"], d["error"]) for d in listed} == {
            ("nap", 2, "HTTP 503")
        }
        assert all(d["target"] == receiver.url and d["failed_at"] for d in listed)
        async with session.get(f"{daemon.url}/health", headers=AUTH) as response:
            assert (await response.json())["webhooks"]["dead"] == 3

        daemon.signal(signal.SIGTERM)
        await daemon.wait_exit()
        daemon = await fleet.start()  # dead letters survive the restart
        assert (await letters(daemon))["count"] == 3

        receiver.status = 200  # the receiver is back
        one = {"task_ids": [ids[0]]}
        async with session.post(f"{daemon.url}/deadletters/redeliver", json=one, headers=AUTH) as r:
            assert (r.status, await r.json()) == (202, {"redelivering": 1})
        await all_delivered(receiver, {ids[0]})
        assert receiver.bodies[ids[0]][0]["task_id"] == ids[0]
        purge = {"task_ids": [ids[1]]}
        async with session.post(f"{daemon.url}/deadletters/purge", json=purge, headers=AUTH) as r:
            assert (r.status, await r.json()) == (200, {"purged": 1})
        every = {"all": True}
        async with session.post(
            f"{daemon.url}/deadletters/redeliver", json=every, headers=AUTH
        ) as r:
            assert (r.status, await r.json()) == (202, {"redelivering": 1})
        await all_delivered(receiver, {ids[2]})
        assert (await letters(daemon)) == {"count": 0, "deadletters": []}
        bad = {"task_ids": [], "all": True}
        async with session.post(f"{daemon.url}/deadletters/purge", json=bad, headers=AUTH) as r:
            assert r.status == 400
    assert ids[1] not in receiver.bodies


async def test_sigterm_keeps_queued_journaled_tasks_for_the_next_start(
    fleets: Callable[..., Fleet], receiver: Receiver
) -> None:
    fleet = fleets(worker={"slots": 1})
    daemon = await fleet.start()
    async with aiohttp.ClientSession() as session:
        ids = {
            (await submit(session, daemon, "nap", receiver.url, 1.0))["task_id"] for _ in range(5)
        }

        async def running() -> bool:
            async with session.get(f"{daemon.url}/health", headers=AUTH) as response:
                return bool((await response.json())["slots"]["used"] == 1)

        await poll(running)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
        last = json.loads(daemon.log_events()[-1])
        assert (last["event"], last["kept"], last["completed"]) == ("stopped", 4, 1)
        assert len(receiver.bodies) == 1
        await fleet.start()
        await all_delivered(receiver, ids)
    assert_each_once_or_resent_alike(receiver, ids)
    assert all(bodies[0]["success"] for bodies in receiver.bodies.values())


async def test_an_idempotency_key_runs_one_task_also_across_a_restart(
    fleets: Callable[..., Fleet], receiver: Receiver
) -> None:
    fleet = fleets()
    daemon = await fleet.start()
    async with aiohttp.ClientSession() as session:
        first = await submit(session, daemon, "nap", receiver.url, 0, key="order-4711")
        again = await submit(session, daemon, "nap", receiver.url, 0, key="order-4711")
        assert "duplicate" not in first
        assert (again["task_id"], again["duplicate"]) == (first["task_id"], True)
        await all_delivered(receiver, {first["task_id"]})
        daemon.signal(signal.SIGTERM)
        await daemon.wait_exit()
        daemon = await fleet.start()
        after = await submit(session, daemon, "nap", receiver.url, 0, key="order-4711")
        assert (after["task_id"], after["duplicate"]) == (first["task_id"], True)
        other = await submit(session, daemon, "nap", receiver.url, 0, key="order-4712")
        await all_delivered(receiver, {other["task_id"]})
        headers = {**AUTH, "Idempotency-Key": "has space"}
        body = task("nap", input={"seconds": 0}, mode="webhook", webhook={"url": receiver.url})
        async with session.post(f"{daemon.url}/task", json=body, headers=headers) as response:
            assert response.status == 400
    assert len(receiver.bodies[first["task_id"]]) == 1
    runs = [
        json.loads(line)
        for d in fleet.every
        for line in d.log_events()
        if '"event": "task"' in line or '"event":"task"' in line
    ]
    assert sum(1 for run in runs if run["task_id"] == first["task_id"]) == 1


async def test_a_corrupt_journal_is_moved_aside_and_the_daemon_starts(
    fleets: Callable[..., Fleet], receiver: Receiver
) -> None:
    fleet = fleets()
    state = fleet.tmp / "state"
    state.mkdir()
    (state / "tasks.sqlite3").write_bytes(os.urandom(8192))
    daemon = await fleet.start()
    events = [json.loads(line) for line in daemon.log_events()]
    (moved,) = [e for e in events if e["event"].startswith("task journal is corrupt")]
    assert await asyncio.to_thread(os.path.exists, moved["moved_to"])
    async with aiohttp.ClientSession() as session:
        done = await submit(session, daemon, "nap", receiver.url, 0)
        await all_delivered(receiver, {done["task_id"]})


async def test_an_unwritable_journal_answers_503_never_a_202_then_recovers(
    worker_app: StartWorker, tmp_path: Path, receiver: Receiver
) -> None:
    client, running = await worker_app(worker={"state_dir": str(tmp_path)})
    journal = running.worker.journal

    def cap(pages: int | None) -> Any:
        def op(conn: sqlite3.Connection) -> Any:
            limit = pages or conn.execute("PRAGMA page_count").fetchone()[0]
            return conn.execute(f"PRAGMA max_page_count = {limit}").fetchall()

        return op

    big = "x" * 200_000
    body = task("typed", input={"text": "ab", "meta": {"blob": big}}, mode="webhook")
    body["webhook"] = {"url": receiver.url}
    await journal._call(cap(None))
    response = await client.post("/task", json=body, headers={"Authorization": AUTH_KEY})
    assert response.status == 503
    assert "journal" in (await response.json())["error"]
    assert response.headers["Retry-After"]
    assert running.dispatcher.in_flight == 0 and running.deliveries.pending == 0
    await journal._call(cap(1_000_000))
    response = await client.post("/task", json=body, headers={"Authorization": AUTH_KEY})
    assert response.status == 202
    task_id = (await response.json())["task_id"]
    await all_delivered(receiver, {task_id})


async def test_a_task_journaled_for_a_client_that_hung_up_still_runs(
    worker_app: StartWorker, tmp_path: Path, receiver: Receiver
) -> None:
    """The client is gone before its 202 while the admit waits for the disk: the task is
    journaled all the same, so it runs and is delivered."""
    client, running = await worker_app(worker={"state_dir": str(tmp_path)})
    journal = running.worker.journal
    edge = running.worker.listener
    entered, disk = threading.Event(), threading.Event()
    writer_held = asyncio.ensure_future(journal._call(lambda conn: (entered.set(), disk.wait(10))))
    await wait_for(entered.is_set)  # the writer is inside it: what comes next waits
    body = task("hello", mode="webhook", _taskId="hung-up-client")
    body["webhook"] = {"url": receiver.url}
    raw = json.dumps(body).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        b"POST /task HTTP/1.1\r\nHost: worker\r\nContent-Type: application/json\r\n"
        + f"Authorization: {AUTH_KEY}\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    await writer.drain()
    await poll(lambda: _admits_waiting(journal), timeout=5)  # the handler awaits its admit
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()  # a reset: the connection is gone at once
    await poll(lambda: _no_connections(edge), timeout=5)
    disk.set()
    await writer_held
    await all_delivered(receiver, {"hung-up-client"})
    assert receiver.bodies["hung-up-client"][0]["success"] is True


async def _admits_waiting(journal: Any) -> bool:
    return bool(journal._pending) or journal._batches.qsize() > 0


async def _no_connections(listener: Any) -> bool:
    return bool(listener.health()["http"]["connections"] == 0)


async def test_a_result_goes_out_only_once_the_journal_holds_it(
    worker_app: StartWorker, tmp_path: Path, receiver: Receiver
) -> None:
    """A kill between a receiver's 2xx and the commit of the result would have the next start
    answer the task again, as interrupted: two different answers for one task (seen in
    test_kills_at_random_moments_lose_nothing once delivery connections were kept alive)."""
    client, running = await worker_app(worker={"state_dir": str(tmp_path)})
    journal = running.worker.journal
    steer = running.registry.functions["wait_gate"].handler.__globals__
    body = task("wait_gate", mode="webhook", input={"gate": "commit"}, _taskId="held-result")
    body["webhook"] = {"url": receiver.url}
    response = await client.post("/task", json=body, headers=AUTH)
    assert response.status == 202
    await asyncio.wait_for(steer["started"]("commit").wait(), 5)
    entered, disk = threading.Event(), threading.Event()
    writer_held = asyncio.ensure_future(journal._call(lambda conn: (entered.set(), disk.wait(10))))
    await wait_for(entered.is_set)  # the writer is inside it: what comes next waits

    async def result_waits() -> bool:  # the function ended; its result is behind the writer
        return "commit" in steer["FINISHED"] and bool(journal._batches.qsize())

    steer["gate"]("commit").set()
    await poll(result_waits, timeout=5)

    async def sent() -> bool:
        return bool(receiver.bodies)

    with pytest.raises(AssertionError):  # nothing goes out while the result is not on disk
        await poll(sent, timeout=1.0)
    disk.set()
    await writer_held
    await all_delivered(receiver, {"held-result"})
    assert len(receiver.bodies["held-result"]) == 1
    assert receiver.bodies["held-result"][0]["success"] is True
