"""A service that never starts, and one whose start hangs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from worker import function, service


@service
async def broken(ctx: Any) -> AsyncIterator[str]:
    raise RuntimeError("no licence for the browser")
    yield "never"


@service
async def hangs(ctx: Any) -> AsyncIterator[str]:
    await asyncio.Event().wait()
    yield "never"


@function
async def noop(params: dict[str, Any], ctx: Any) -> str:
    return "ok"
