"""Functions for the durable webhook tests: the same nap, once not idempotent, once idempotent."""

from __future__ import annotations

import asyncio
from typing import Any

from worker import function


@function(params={"seconds": {"type": "number", "min": 0, "max": 10}})
async def nap(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    await asyncio.sleep(params["seconds"])
    return {"napped": params["seconds"], "task": ctx.task_id}


@function(params={"seconds": {"type": "number", "min": 0, "max": 10}}, idempotent=True)
async def nap_again(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    await asyncio.sleep(params["seconds"])
    return {"napped": params["seconds"], "task": ctx.task_id}
