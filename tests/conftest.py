"""Shared fixtures: a real base-worker app on a loopback port, configured per test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient
from hypothesis import settings
from yarl import URL

from worker import config, functions, lifecycle, parts
from worker.logs import LogBuffer, Logging
from worker.notify import Notifier

# Property tests run on a shared 2-core machine: no per-example deadline, a bounded count.
settings.register_profile("suite", deadline=None, max_examples=200)
settings.load_profile("suite")

AUTH_KEY = "test-auth-key-0123456789"
LB_KEY = "test-lb-key-9876543210"
AUTH = {"Authorization": AUTH_KEY}
TEST_FUNCTIONS = str(Path(__file__).parent / "functions" / "testing.py")
ROOT = Path(__file__).resolve().parent.parent


# Every kind of JSON value, and the edges of the envelope's ranges and choices (the property
# tests of the fast paths run each of them through both paths).
JSON_VALUES: list[Any] = [None, True, False, 0, 1, 3, -3, 2.5, 2097152, 2097153, "", "hello"]
JSON_VALUES += [[], [1], {}, {"name": "Andera"}, [None], [1, None], "stream", "sync", "webhook"]
JSON_VALUES += ["x" * 40]


def make_config(**sections: dict[str, Any]) -> config.Config:
    """A config from defaults plus `section={key: value}` overrides (no file, no environment)."""
    values: dict[str, Any] = {
        "auth.auth_key": AUTH_KEY,
        "auth.lb_auth_key": LB_KEY,
        "worker.functions": ["worker.examples", TEST_FUNCTIONS],
        "load_balancer.websocket_port": 0,
    }
    for section, table in sections.items():
        for key, value in table.items():
            values[f"{section}.{key}"] = value
    return config.load(None, environ={}, flags=values)


def task(function: str, contract: int = 1, **fields: Any) -> dict[str, Any]:
    """A POST /task body."""
    return {"function": function, "contract": contract, **fields}


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `predicate` on the event loop until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


class Running:
    """An in-process worker, its parts started as the daemon starts them, seen from a test.

    It serves on an ephemeral loopback port through its own listener (worker/server.py: the
    edge, and handlers that a hanging-up client does not cancel); the logging pipeline is the
    test run's own (its part is neither reloaded nor given the daemon's output).
    """

    def __init__(self, cfg: config.Config) -> None:
        self.config = cfg
        logging = Logging(LogBuffer(100))
        self.worker = lifecycle.build(
            cfg, functions.load(cfg.worker.functions), logging, Notifier({}, 0), []
        )
        self.parts = list(self.worker.parts)
        self.slots = self.worker.slots
        self.dispatcher = self.worker.dispatcher
        self.deliveries = self.worker.deliveries
        self.registry = self.worker.registry
        self.logs = self.worker.logs

    def apply(self, new: config.Config) -> None:
        """A reload, as SIGHUP does it."""
        parts.apply_all((p for p in self.parts if p is not self.worker.logging), new)
        self.config = new

    def set_maintenance(self, on: bool) -> None:
        self.worker.maintenance.set(on)

    async def wait_drained(self) -> None:
        await self.worker.idle()


class Listening(BaseTestServer):
    """A test client's view of a worker's own listener: the worker's parts start and stop it."""

    def __init__(self, running: Running) -> None:
        super().__init__(host="127.0.0.1")
        self.running = running
        self.app: web.Application = running.worker.app

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self._root is not None:
            return
        await parts.start_all(self.running.parts)
        self.running.slots.hold("starting", False)
        (self.port,) = self.running.worker.listener.ports
        self._root = URL(f"http://127.0.0.1:{self.port}")

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        raise NotImplementedError("the worker's own listener serves")

    @property
    def started(self) -> bool:
        return self._root is not None

    async def close(self) -> None:
        if self._root is not None and not self._closed:
            self._closed = True
            self.running.logs.close()  # end /logs follows, as the daemon's stop does
            await parts.stop_all(self.running.parts, asyncio.get_running_loop().time())


Worker = tuple[TestClient[Any, Any], Running]


@pytest.fixture
async def daemons() -> AsyncIterator[list[Any]]:
    """Subprocess daemons a test starts (tests.daemon.start_daemon); all stopped at its end."""
    started: list[Any] = []
    yield started
    for daemon in started:
        await daemon.stop()


@pytest.fixture
def worker_app(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> Callable[..., Awaitable[Worker]]:
    """Start a real server on loopback for a config; returns (client, running worker)."""

    async def start(**sections: dict[str, Any]) -> Worker:
        http = {"host": "127.0.0.1", "port": 0, **sections.pop("http", {})}
        running = Running(make_config(http=http, **sections))
        client = await aiohttp_client(Listening(running))
        return client, running

    return start
