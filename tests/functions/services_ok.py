"""Two services and a function that reads them; with SERVICE_MARKS set (subprocess tests), every
start, stop and task end is appended to that file, so a test can read their order."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from worker import function, service

EVENTS: list[str] = []


def mark(event: str) -> None:
    EVENTS.append(event)
    path = os.environ.get("SERVICE_MARKS")
    if path:
        with open(path, "a", encoding="utf-8") as marks:
            marks.write(event + "\n")


@service
async def first(ctx: Any) -> AsyncIterator[dict[str, int]]:
    mark("first up")
    yield {"pool": 3}
    mark("first down")


@service(name="second")
async def second_service(ctx: Any) -> AsyncIterator[str]:
    mark("second up")
    yield "warm"
    mark("second down")


@function(params={"seconds": {"type": "number", "default": 0}})
async def uses_services(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    await asyncio.sleep(params["seconds"])
    mark("task done")
    return {"first": ctx.services["first"], "second": ctx.services["second"]}
