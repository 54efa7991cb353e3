"""Shared fixtures: a real base-worker app on a loopback port, configured per test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from worker import config, functions
from worker.app import build_app
from worker.logs import LogBuffer
from worker.runtime import Runtime

AUTH_KEY = "test-auth-key-0123456789"
LB_KEY = "test-lb-key-9876543210"
AUTH = {"Authorization": AUTH_KEY}
TEST_FUNCTIONS = str(Path(__file__).parent / "functions" / "testing.py")
ROOT = Path(__file__).resolve().parent.parent


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


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Poll `predicate` on the event loop until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


Worker = tuple[TestClient[Any, Any], Runtime]


@pytest.fixture
def worker_app(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> Callable[..., Awaitable[Worker]]:
    """Start a real server on loopback for a config; returns (client, runtime)."""

    async def start(**sections: dict[str, Any]) -> Worker:
        cfg = make_config(**sections)
        runtime = Runtime(cfg, functions.load(cfg.worker.functions), LogBuffer(100))
        client = await aiohttp_client(build_app(runtime))
        return client, runtime

    return start
