"""A service that fails its first start and asks to be restarted, and one that never starts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from worker import function, service

STARTS = {"flaky": 0}


@service(restart_on_failure=True)
async def flaky(ctx: Any) -> AsyncIterator[str]:
    STARTS["flaky"] += 1
    if STARTS["flaky"] == 1:
        raise ConnectionError("the pool is not there yet")
    yield f"started on attempt {STARTS['flaky']}"


@function
async def noop(params: dict[str, Any], ctx: Any) -> str:
    return "ok"
