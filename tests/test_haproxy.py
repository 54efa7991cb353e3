"""Two workers behind a real haproxy that polls GET /ready: a client loop through it sees no failed
request while each worker in turn is stopped (SIGTERM) and started again, nor while one is
switched off. haproxy's configuration here is the one docs/load-balancers.md recommends."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import unused_port

from tests.conftest import AUTH, ROOT, task
from tests.daemon import Daemon

pytestmark = pytest.mark.timeout(120)

HAPROXY = shutil.which("haproxy")
# haproxy marks a server down after one failed check, checking every 200 ms: a worker stays
# routable for up to that long after it said so, so its drain grace covers it (and more).
DRAIN_GRACE = 1.0


def haproxy_config(front: int, ports: list[int]) -> str:
    """docs/load-balancers.md's recommended configuration, on test ports."""
    text = (ROOT / "docs" / "haproxy.cfg").read_text()
    servers = "\n".join(
        f"    server worker{i} 127.0.0.1:{port} check" for i, port in enumerate(ports, 1)
    )
    text = text.replace("    server worker1 10.0.0.11:3000 check\n", "")
    text = text.replace("    server worker2 10.0.0.12:3000 check\n", servers + "\n")
    return text.replace("bind :80", f"bind 127.0.0.1:{front}").replace("AUTH_KEY_HERE", "")


class Fleet:
    """The workers, each restartable on its own port."""

    def __init__(self, tmp: Path, ports: list[int]) -> None:
        self.tmp = tmp
        self.ports = ports
        self.generation = 0
        self.daemons: list[Daemon | None] = [None] * len(ports)
        self.every: list[Daemon] = []  # this generation and those before, to clean up

    async def start(self, index: int) -> Daemon:
        self.generation += 1
        home = self.tmp / f"w{index}-{self.generation}"
        home.mkdir()
        daemon = Daemon(
            home,
            http={"port": self.ports[index]},
            worker={"drain_grace": DRAIN_GRACE, "slots": 4},
        )
        self.every.append(daemon)
        await daemon.start()
        await daemon.wait_ready()
        self.daemons[index] = daemon
        return daemon

    async def stop_all(self) -> None:
        for daemon in self.every:
            await daemon.stop()


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    workers = Fleet(tmp_path, [unused_port(), unused_port()])
    yield workers
    await workers.stop_all()


@pytest.fixture
async def haproxy(tmp_path: Path, fleet: Fleet) -> AsyncIterator[str]:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (.ci/system-deps installs it as root)")
    front = unused_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(front, fleet.ports))
    process = await asyncio.create_subprocess_exec(
        HAPROXY, "-db", "-f", str(config), stdout=asyncio.subprocess.DEVNULL
    )
    try:
        yield f"http://127.0.0.1:{front}"
    finally:
        process.terminate()
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(process.wait(), 10)


async def until_served_by_both(session: aiohttp.ClientSession, url: str) -> None:
    """haproxy has seen both workers ready (its first checks), bounded."""
    deadline = time.monotonic() + 20
    while True:
        async with session.get(f"{url}/ready") as response:
            if response.status == 200:
                break
        assert time.monotonic() < deadline, "haproxy never routed"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # two more check rounds: both servers up, not only the first


async def client_loop(
    session: aiohttp.ClientSession, url: str, stop: asyncio.Event, outcomes: Counter[str]
) -> None:
    """POST /task hello through haproxy until told to stop (at most 5,000 requests)."""
    for _ in range(5000):
        if stop.is_set():
            return
        try:
            async with session.post(f"{url}/task", json=task("hello"), headers=AUTH) as response:
                outcomes[str(response.status)] += 1
        except aiohttp.ClientError as exc:
            outcomes[type(exc).__name__] += 1


async def test_no_request_fails_through_restarts_and_maintenance(
    fleet: Fleet, haproxy: str
) -> None:
    for index in range(len(fleet.ports)):
        await fleet.start(index)
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        await until_served_by_both(session, haproxy)
        loops = [
            asyncio.create_task(client_loop(session, haproxy, stop, outcomes)) for _ in range(4)
        ]
        try:
            for index in range(len(fleet.ports)):
                daemon = fleet.daemons[index]
                assert daemon is not None
                daemon.signal(signal.SIGTERM)
                assert await daemon.wait_exit() == 0
                await fleet.start(index)
                await asyncio.sleep(1.0)  # the loop runs on, served by both again
            first = fleet.daemons[0]
            assert first is not None
            async with session.post(f"{first.url}/off", headers=AUTH) as response:
                assert response.status == 200
            await asyncio.sleep(1.0)  # the loop runs on, served by the other one
            async with session.post(f"{first.url}/on", headers=AUTH) as response:
                assert response.status == 200
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*loops)
    assert set(outcomes) == {"200"}, outcomes
    assert outcomes["200"] > 100  # the loop really ran throughout
