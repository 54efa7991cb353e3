"""Functions installed into the container by the end-to-end test (not a test module)."""

from __future__ import annotations

import asyncio
from typing import Any

from worker import function


@function(params={"seconds": {"type": "number", "required": False, "default": 2, "min": 0}})
async def sleepy(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Sleep without blocking the event loop, so a drain has work in flight."""
    await asyncio.sleep(params["seconds"])
    return {"slept": params["seconds"]}


@function(params={"marker": {"type": "string", "required": True}})
async def log_marker(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Log one info and one warning line carrying `marker`, for the journald priority check."""
    ctx.log.info(f"e2e-info {params['marker']}")
    ctx.log.warning(f"e2e-warning {params['marker']}")
    return {"marker": params["marker"]}
