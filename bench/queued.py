"""Memory per queued sync task, by where it was allocated: `count` no-op tasks queued behind
busy slots through the worker's own listener, in-process, with tracemalloc on.

    python -m bench.queued [--tasks 2000] [--lines 25]
    PYTHONPATH=/tmp/other python bench/queued.py   # another checkout's `worker` package

Prints the bytes per queued task (all allocations made between connecting and the last task
queued, the client's own streams left out) and the allocation sites that hold the most. The
RSS figure of `bench.run` scenario (e) counts pages; this one counts Python's allocations, so
the two differ, but they move together. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import linecache
import tracemalloc
from pathlib import Path
from typing import Any

if __package__:
    from bench.handler import KEY, build_worker
else:  # run as a file, another checkout's `worker` on PYTHONPATH: this folder is on the path
    from handler import KEY, build_worker  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent

NOOP = b'{"function": "noop", "contract": 1}'
HOLD = b'{"function": "sleeper", "input": {"seconds": 60}, "contract": 1}'
SLOTS = 10


def post(body: bytes) -> bytes:
    head = (
        f"POST /task HTTP/1.1\r\nHost: bench\r\nAuthorization: {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def until(slots: Any, predicate: Any, seconds: float = 30.0) -> None:
    """Return once the slots' state satisfies `predicate` (told of every change)."""
    reached = asyncio.Event()

    def check() -> None:
        if predicate(slots.state()):
            reached.set()

    undo = slots.subscribe(check)
    try:
        check()
        async with asyncio.timeout(seconds):
            await reached.wait()
    finally:
        undo()


async def measure(count: int, lines: int) -> None:
    from worker import parts

    worker = build_worker(
        **{
            "worker.slots": SLOTS,
            "worker.max_queue": count + 100,
            "http.host": "127.0.0.1",
            "http.port": 0,
        }
    )
    await parts.start_all(worker.parts)
    worker.slots.hold("starting", False)
    (port,) = worker.listener.ports
    writers = []
    try:
        for _ in range(SLOTS):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(HOLD))
            writers.append(writer)
        await until(worker.slots, lambda state: state.used == SLOTS)
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
        writers += [writer for _, writer in clients]
        await asyncio.sleep(0.3)  # the accepts settle
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for _, writer in clients:
            writer.write(post(NOOP))
        await until(worker.slots, lambda state: state.queue == count)
        await asyncio.sleep(0.3)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    finally:
        for writer in writers:
            writer.close()
        worker.dispatcher.cancel_all()
        await parts.stop_all(worker.parts, asyncio.get_running_loop().time() + 5)
    ours = [
        tracemalloc.Filter(False, "*/asyncio/streams.py"),
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, __file__),
    ]
    grown = after.filter_traces(ours).compare_to(before.filter_traces(ours), "lineno")
    total = sum(stat.size_diff for stat in grown)
    print(f"{total / count:.0f} bytes per queued task ({count} tasks)")
    for stat in grown[:lines]:
        frame = stat.traceback[0]
        where = frame.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        code = linecache.getline(frame.filename, frame.lineno).strip()[:60]
        print(f"{stat.size_diff / count:7.0f} B  {where}:{frame.lineno}  {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--lines", type=int, default=25)
    args = parser.parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(measure(args.tasks, args.lines))


if __name__ == "__main__":
    main()
