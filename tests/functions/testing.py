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


@function
async def nan_result(params: dict[str, Any], ctx: Any) -> float:
    return float("nan")


@function(params={"depth": {"type": "number", "default": 5000}})
async def deep_result(params: dict[str, Any], ctx: Any) -> list[Any]:
    """A result nested deeper than any JSON encoder goes."""
    nested: list[Any] = []
    for _ in range(int(params["depth"])):
        nested = [nested]
    return nested


@function(streaming=True)
async def stream_bytes(params: dict[str, Any], ctx: Any) -> AsyncIterator[Any]:
    """Bytes chunks of every kind: ASCII, other UTF-8, undecodable, a bytearray, then text."""
    yield b"ascii "
    yield "\u00e9t\u00e9 ".encode()
    yield b"\xff "
    yield bytearray(b"mutable ")
    yield "text"


@function(streaming=True)
async def stream_infinity(params: dict[str, Any], ctx: Any) -> AsyncIterator[Any]:
    """A first chunk, then one that JSON cannot hold."""
    yield "first\n"
    yield {"v": float("inf")}


# Mode stream and the logs (tests/test_streaming.py, tests/test_logtail.py).
PROGRESS: dict[str, int] = {}


@function(
    params={
        "gate": {"type": "string", "required": True},
        "fail": {"type": "string", "enum": ["no", "before", "after"], "default": "no"},
    },
    streaming=True,
)
async def stream_gate(params: dict[str, Any], ctx: Any) -> None:
    """Writes `first`, waits for its gate, writes `second`; may fail before or after output."""
    if params["fail"] == "before":
        raise RuntimeError("failed before any output")
    await ctx.stream("first\n")
    started(params["gate"]).set()
    await gate(params["gate"]).wait()
    if params["fail"] == "after":
        raise RuntimeError("failed after output began")
    await ctx.stream("second\n")
    FINISHED.append(params["gate"])


@function(params={"gate": {"type": "string", "required": True}}, streaming=True)
async def stream_until_gone(params: dict[str, Any], ctx: Any) -> AsyncIterator[str]:
    """Yields a chunk, waits for its gate, then keeps yielding (bounded) until stopped."""
    yield "first\n"
    await gate(params["gate"]).wait()
    for index in range(5000):
        PROGRESS[params["gate"]] = index
        yield f"more {index}\n"
        await asyncio.sleep(0.001)
    FINISHED.append(params["gate"])


@function(streaming=True)
async def stream_shapes(params: dict[str, Any], ctx: Any) -> AsyncIterator[Any]:
    """A multi-line string, then a JSON-able object."""
    yield "line one\nline two"
    yield {"n": 1}


@function(
    params={"key": {"type": "string", "required": True}, "chunks": {"type": "number"}},
    streaming=True,
)
async def stream_bulk(params: dict[str, Any], ctx: Any) -> None:
    """Writes `chunks` chunks of 64 KiB, counting them in PROGRESS[key]."""
    block = "x" * 65536
    for index in range(int(params["chunks"])):
        await ctx.stream(block)
        PROGRESS[params["key"]] = index + 1
    FINISHED.append(params["key"])


@function(params={"text": {"type": "string", "required": True}})
async def log_line(params: dict[str, Any], ctx: Any) -> str:
    """Logs `text` through the task's logger."""
    ctx.log.info("function says", text=params["text"])
    return params["text"]


@function(params={"key": {"type": "string", "required": True}}, streaming=True, max_retries=2)
async def stream_flaky(params: dict[str, Any], ctx: Any) -> None:
    """Writes its attempt number, then fails on its first two calls for a given key."""
    CALLS[params["key"]] = CALLS.get(params["key"], 0) + 1
    if ctx.stream:
        await ctx.stream(f"attempt {CALLS[params['key']]}\n")
    if CALLS[params["key"]] <= 2:
        raise RuntimeError(f"attempt {CALLS[params['key']]} failed")


@function(streaming=True)
async def stream_returns_object(params: dict[str, Any], ctx: Any) -> object:
    """Returns (instead of streaming) something that is not JSON."""
    return object()


# Results the webhook deliveries must survive (tests/test_webhook_safety.py).
@function(params={"depth": {"type": "number", "min": 1, "max": 100000}})
async def nested_result(params: dict[str, Any], ctx: Any) -> list[Any]:
    value: list[Any] = []
    for _ in range(int(params["depth"])):
        value = [value]
    return value


@function(params={"sign": {"type": "number", "default": 1}})
async def infinite_result(params: dict[str, Any], ctx: Any) -> dict[str, float]:
    return {"value": params["sign"] * float("inf")}


@function(params={"size": {"type": "number", "min": 0}})
async def sized_result(params: dict[str, Any], ctx: Any) -> str:
    return "x" * int(params["size"])


class Unreadable(dict[str, Any]):
    """A dict whose items cannot be read: JSON encoding fails with a RuntimeError."""

    def items(self) -> Any:
        raise RuntimeError("cannot read this result")

    def __iter__(self) -> Any:
        raise RuntimeError("cannot read this result")


@function
async def unreadable_result(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return Unreadable(a=1)


class Tracked(dict[str, Any]):
    """A result a test can watch (through a weak reference) to see whether it is still held."""


TRACKED: list[Any] = []


@function
async def tracked_result(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    import weakref

    value = Tracked(data="y" * 1000)
    TRACKED.append(weakref.ref(value))
    return value


@function(params={"seconds": {"type": "number", "min": 0, "max": 60}})
async def own_timeout(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Bounds its own wait with asyncio.timeout and a task group: both take the task the
    function runs in as it enters them, before its first wait."""
    try:
        async with asyncio.timeout(0.3), asyncio.TaskGroup() as group:
            group.create_task(asyncio.sleep(params["seconds"]))
    except TimeoutError:
        return {"own_timeout": "passed"}
    return {"own_timeout": "not reached"}
