"""Functions for the write-gathering tests of mode stream (tests/test_stream_writes.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from worker import function

GATES: dict[str, asyncio.Event] = {}
FINISHED: list[str] = []
PROGRESS: dict[str, int] = {}
WRITE_BUFFER_PEAK: dict[str, int] = {}
TRANSPORTS: dict[str, Any] = {}  # a stream's connection, as its function saw it
GATHERING: dict[str, list[bool]] = {}  # whether that connection gathered, after each chunk


def gate(name: str) -> asyncio.Event:
    return GATES.setdefault(name, asyncio.Event())


def burst(key: str, part: int, count: int) -> list[str]:
    """The chunks of one burst: small, numbered lines."""
    return [f"{key} {part} {index}\n" for index in range(count)]


@function(
    params={"key": {"type": "string", "required": True}, "count": {"type": "number"}},
    streaming=True,
)
async def stream_bursts(params: dict[str, Any], ctx: Any) -> AsyncIterator[str]:
    """A burst of small chunks in one loop turn, a wait for the gate, a second burst."""
    key, count = params["key"], int(params.get("count", 50))
    for chunk in burst(key, 1, count):
        yield chunk
    await gate(key).wait()
    for chunk in burst(key, 2, count):
        yield chunk
    FINISHED.append(key)


@function(
    params={"key": {"type": "string", "required": True}, "count": {"type": "number"}},
    streaming=True,
)
async def stream_calls(params: dict[str, Any], ctx: Any) -> None:
    """stream_bursts through `await ctx.stream(...)` instead of a generator."""
    key, count = params["key"], int(params.get("count", 50))
    for chunk in burst(key, 1, count):
        await ctx.stream(chunk)
    await gate(key).wait()
    for chunk in burst(key, 2, count):
        await ctx.stream(chunk)
    FINISHED.append(key)


@function(params={"writers": {"type": "number"}, "lines": {"type": "number"}}, streaming=True)
async def stream_writers(params: dict[str, Any], ctx: Any) -> None:
    """Several tasks write at once, from the very first chunk on: small lines, and every
    tenth line a large block of lines (64 KiB and more), with yields in between."""

    async def writer(name: int) -> None:
        for index in range(int(params["lines"])):
            if index % 10 == 9:
                await ctx.stream("".join(f"{name} {index} {part}\n" for part in range(6000)))
            else:
                await ctx.stream(f"{name} {index}\n")
            if index % 3 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(writer(name) for name in range(int(params["writers"]))))


@function(
    params={"key": {"type": "string", "required": True}, "chunks": {"type": "number"}},
    streaming=True,
)
async def stream_trickle(params: dict[str, Any], ctx: Any) -> AsyncIterator[str]:
    """4 KiB chunks, yielding to the loop after each (so each is written by a flush), counting
    them and the peak of the server transport's write buffer."""
    key = params["key"]
    block = "y" * 4096
    transport = ctx.stream.request.transport
    for index in range(int(params["chunks"])):
        yield block
        await asyncio.sleep(0)
        PROGRESS[key] = index + 1
        if transport is not None:
            size = transport.get_write_buffer_size()
            WRITE_BUFFER_PEAK[key] = max(WRITE_BUFFER_PEAK.get(key, 0), size)
    FINISHED.append(key)


MIXED_CHUNKS: list[Any] = [
    "small, ",
    "x" * 70000,  # text big enough to go out as it comes: after what was gathered before it
    "é" * 40000,  # fewer characters than a write's size, more bytes
    b"raw bytes, ",
    {"n": 1},
    "y" * 65536,
    "tail",
]


@function(streaming=True)
async def stream_mixed(params: dict[str, Any], ctx: Any) -> AsyncIterator[Any]:
    """Chunks of every kind and size, all in one turn of the loop."""
    for chunk in MIXED_CHUNKS:
        yield chunk


@function(
    params={"key": {"type": "string", "required": True}, "count": {"type": "number"}},
    streaming=True,
)
async def stream_blocks(params: dict[str, Any], ctx: Any) -> AsyncIterator[str]:
    """`count` chunks of 64 KiB in one turn of the loop, a wait for the gate, one more; notes
    whether its connection gathered writes after each chunk."""
    key = params["key"]
    transport = TRANSPORTS[key] = ctx.stream.request.transport
    seen = GATHERING.setdefault(key, [])
    for index in range(int(params["count"])):
        yield chr(ord("a") + index % 26) * 65536
        seen.append(transport.gathering)
    await gate(key).wait()
    yield "end"
