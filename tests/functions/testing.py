"""Functions the tests call. In-process tests steer them through events; subprocess tests
through their params (durations), since no event crosses a process boundary."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from worker import function, tag

# In-process coordination: a test creates the events it needs before it sends a task.
GATES: dict[str, asyncio.Event] = {}
STARTED: dict[str, asyncio.Event] = {}
FINISHED: list[str] = []
CALLS: dict[str, int] = {}


def gate(name: str) -> asyncio.Event:
    return GATES.setdefault(name, asyncio.Event())


def started(name: str) -> asyncio.Event:
    return STARTED.setdefault(name, asyncio.Event())


@function(params={"gate": {"type": "string", "required": True}, "label": {"type": "string"}})
async def wait_gate(params: dict[str, Any], ctx: Any) -> str:
    label = params.get("label", params["gate"])
    started(label).set()
    await gate(params["gate"]).wait()
    FINISHED.append(label)
    return label


@function(params={"message": {"type": "string", "default": "boom"}})
async def fail(params: dict[str, Any], ctx: Any) -> None:
    raise ValueError(params["message"])


@function(params={"seconds": {"type": "number", "min": 0, "max": 60}}, timeout=0.3)
async def sleep_limited(params: dict[str, Any], ctx: Any) -> str:
    await asyncio.sleep(params["seconds"])
    return "slept"


@function(params={"seconds": {"type": "number", "min": 0, "max": 60}}, streaming=True)
async def sleep(params: dict[str, Any], ctx: Any) -> dict[str, float]:
    await asyncio.sleep(params["seconds"])
    return {"slept": params["seconds"]}


@function(params={"seconds": {"type": "number", "min": 0, "max": 60}})
def block(params: dict[str, Any], ctx: Any) -> dict[str, float]:
    time.sleep(params["seconds"])
    return {"blocked": params["seconds"]}


@function(params={"seconds": {"type": "number", "min": 0, "max": 60}}, timeout=0.2)
def block_limited(params: dict[str, Any], ctx: Any) -> str:
    time.sleep(params["seconds"])
    return "done"


@function(
    params={
        "text": {"type": "string", "required": True, "min": 2, "max": 5, "pattern": "^[a-z]+$"},
        "count": {"type": "number", "min": 1, "max": 10},
        "flag": {"type": "boolean"},
        "colour": {"type": "string", "enum": ["red", "green"]},
        "tags": {"type": "array", "max": 2},
        "meta": {"type": "object"},
    }
)
async def typed(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return params


@function(params={"key": {"type": "string", "required": True}}, max_retries=2)
async def flaky(params: dict[str, Any], ctx: Any) -> int:
    """Fails on its first two calls for a given key, then succeeds."""
    CALLS[params["key"]] = CALLS.get(params["key"], 0) + 1
    if CALLS[params["key"]] <= 2:
        raise RuntimeError(f"attempt {CALLS[params['key']]} failed")
    return CALLS[params["key"]]


@function(params={"count": {"type": "number", "default": 3}}, streaming=True)
async def chunks(params: dict[str, Any], ctx: Any) -> AsyncIterator[str]:
    for index in range(int(params["count"])):
        yield f"chunk{index} "


@function
async def not_json(params: dict[str, Any], ctx: Any) -> object:
    return object()


@tag("test-tag")
async def test_tag() -> str:
    return "tag-value"


@function
def thread_name(params: dict[str, Any], ctx: Any) -> str:
    """A plain `def`: runs in the worker's thread pool."""
    import threading

    return threading.current_thread().name


@function
async def loop_thread_name(params: dict[str, Any], ctx: Any) -> str:
    """An `async def`: runs on the event loop's thread."""
    import threading

    return threading.current_thread().name


@function
async def numbers(params: dict[str, Any], ctx: Any) -> AsyncIterator[int]:
    """A generator of non-strings: collected as a list outside mode stream."""
    for value in (1, 2, 3):
        yield value


@function
async def context(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {
        "task_id": ctx.task_id,
        "function": ctx.function,
        "priority": ctx.priority,
        "mode": ctx.mode,
        "stream": ctx.stream is None,
    }
