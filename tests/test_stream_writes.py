"""Mode stream gathers small chunks into fewer writes (worker/streaming.py): never at the cost
of a chunk's delivery once the function waits for something else, of order, of content, or of
back-pressure. Against a real server on loopback."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import AUTH, TEST_FUNCTIONS, Running, Worker, task, wait_for

StartWorker = Callable[..., Awaitable[Worker]]
STREAMS = str(Path(__file__).parent / "functions" / "streams.py")
FUNCTIONS = {"functions": ["worker.examples", TEST_FUNCTIONS, STREAMS]}
SSE = {**AUTH, "Accept": "text/event-stream"}


def streams_of(runtime: Running) -> ModuleType:
    """tests/functions/streams.py as the worker loaded it."""
    spec = runtime.registry.get("stream_bursts")
    assert spec is not None
    return sys.modules[spec.handler.__module__]


@pytest.mark.parametrize("function", ["stream_bursts", "stream_calls"])
async def test_small_chunks_reach_the_client_while_the_function_waits(
    worker_app: StartWorker, function: str
) -> None:
    client, runtime = await worker_app(worker=FUNCTIONS)
    streams = streams_of(runtime)
    key = f"pause-{function}"
    first = "".join(streams.burst(key, 1, 50)).encode()
    second = "".join(streams.burst(key, 2, 50)).encode()
    body = task(function, mode="stream", input={"key": key, "count": 50})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert resp.status == 200
        # The whole first burst arrives while the function waits for its gate: nothing of it
        # is held back for a later write.
        assert await resp.content.readexactly(len(first)) == first
        assert key not in streams.FINISHED
        streams.gate(key).set()
        assert await resp.content.read() == second
    assert key in streams.FINISHED


async def test_small_chunks_are_framed_one_event_each_in_sse(worker_app: StartWorker) -> None:
    client, runtime = await worker_app(worker=FUNCTIONS)
    streams = streams_of(runtime)
    key = "pause-sse"
    body = task("stream_bursts", mode="stream", input={"key": key, "count": 20})
    async with client.post("/task", json=body, headers=SSE) as resp:
        frames = [f"data: {line[:-1]}\ndata: \n\n" for line in streams.burst(key, 1, 20)]
        first = "".join(frames).encode()
        assert await resp.content.readexactly(len(first)) == first
        streams.gate(key).set()
        rest = (await resp.read()).decode()
    events = rest.split("\n\n")
    assert events[:-2] == [f"data: {line[:-1]}\ndata: " for line in streams.burst(key, 2, 20)]
    assert events[-2].startswith("event: end\ndata: ")


async def test_concurrent_writers_keep_every_chunk_whole_and_in_its_writer_order(
    worker_app: StartWorker,
) -> None:
    client, _ = await worker_app(worker=FUNCTIONS)
    writers, lines = 4, 40
    body = task("stream_writers", mode="stream", input={"writers": writers, "lines": lines})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    seen: dict[str, list[tuple[int, int]]] = {str(name): [] for name in range(writers)}
    for line in text.splitlines():
        name, index, *part = line.split(" ")
        seen[name].append((int(index), int(part[0]) if part else -1))
    for name in range(writers):
        expected = []
        for index in range(lines):
            parts = range(6000) if index % 10 == 9 else [-1]
            expected += [(index, part) for part in parts]
        assert seen[str(name)] == expected


async def test_a_reader_that_stops_reading_holds_back_a_function_of_small_chunks(
    worker_app: StartWorker,
) -> None:
    client, runtime = await worker_app(worker=FUNCTIONS)
    streams = streams_of(runtime)
    key = "trickle"
    chunks = 32768  # 128 MiB: far more than the socket buffers between us hold
    body = task("stream_trickle", mode="stream", input={"key": key, "chunks": chunks})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        await resp.content.readexactly(4096)
        await wait_for(lambda: streams.PROGRESS.get(key, 0) > 1)

        def finished() -> bool:
            return key in streams.FINISHED

        # Not reading: the function must stall well before the end (a bounded negative wait),
        # with the server's own buffer never holding much more than one write.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await wait_for(finished, timeout=1.0)
        assert streams.PROGRESS[key] < chunks
        assert streams.WRITE_BUFFER_PEAK.get(key, 0) < 1 << 20
        received = 4096
        while data := await resp.content.read(1 << 20):
            assert data == b"y" * len(data)
            received += len(data)
    assert received == chunks * 4096
    await wait_for(finished)
    assert streams.WRITE_BUFFER_PEAK[key] < 1 << 20
    await wait_for(lambda: runtime.slots.state().used == 0)


async def test_chunks_of_every_kind_and_size_arrive_whole_and_in_order(
    worker_app: StartWorker,
) -> None:
    """Big text goes out as it comes, small chunks are gathered: neither overtakes the other."""
    client, _ = await worker_app(worker=FUNCTIONS)
    text = "small, " + "x" * 70000 + "é" * 40000 + "raw bytes, " + '{"n": 1}\n' + "y" * 65536
    async with client.post("/task", json=task("stream_mixed", mode="stream"), headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.read() == (text + "tail").encode()


async def test_big_chunks_of_one_turn_reach_the_client_while_the_function_waits(
    worker_app: StartWorker,
) -> None:
    """Chunks of 64 KiB written in one turn are gathered by the connection (fewer writes), yet
    all of them are out once the function waits; after the stream the connection gathers no
    more, for the next request on it."""
    client, runtime = await worker_app(worker=FUNCTIONS)
    streams = streams_of(runtime)
    key, count = "blocks", 6
    blocks = b"".join(bytes([ord("a") + index]) * 65536 for index in range(count))
    body = task("stream_blocks", mode="stream", input={"key": key, "count": count})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.content.readexactly(len(blocks)) == blocks
        # The connection gathered from the first chunk's write on.
        assert streams.GATHERING[key] == [True] * count
        streams.gate(key).set()
        assert await resp.content.read() == b"end"
    assert streams.TRANSPORTS[key].gathering is False
