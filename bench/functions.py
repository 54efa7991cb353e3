"""Functions the benchmarks call; the worker loads this file by path (`worker.functions`)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

from worker import function

CHUNK = "x" * 65536  # one 64 KiB stream chunk, built once
_started = itertools.count()


@function
async def noop(params: dict[str, Any], ctx: Any) -> None:
    """Does nothing: the cost of a task is all the worker's own."""
    return None


@function(params={"seconds": {"type": "number", "min": 0, "max": 60}})
async def sleeper(params: dict[str, Any], ctx: Any) -> dict[str, int]:
    """Holds its slot for `seconds`; returns the order in which it started (FIFO checks)."""
    started = next(_started)
    await asyncio.sleep(params.get("seconds", 0.01))
    return {"started": started}


@function(params={"count": {"type": "number", "min": 1, "max": 100000}}, streaming=True)
async def chunks(params: dict[str, Any], ctx: Any) -> AsyncIterator[str]:
    """Yields `count` chunks of 64 KiB (streams each one in mode stream)."""
    for _ in range(int(params.get("count", 64))):
        yield CHUNK
