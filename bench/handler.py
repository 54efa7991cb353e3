"""The worker's own work per task, in-process: POST /task `hello` as the listener serves it
(the listener's entry, handler, answer) against bench/baseline.py's application, the same requests
built the same way, one at a time on uvloop. No sockets, no wrk, no second process: what is
left between the two is the worker's own CPU time and its own allocations per task.

    python -m bench.handler --which worker|baseline [--requests N]
    python -m bench.handler --mode webhook           # the worker's webhook accept, below
    PYTHONPATH=/tmp/other python bench/handler.py   # another checkout's `worker` package

Prints, per request: CPU µs (best of 5 batches), Python and C function calls, the peak of memory
allocated at once (tracemalloc) and memory blocks still held after it (the worker keeps its
last log lines for /logs). docs/performance.md, "Issue #14: the worker's own CPU per task,
second pass" (how it was measured) and "Issue #14, eighth pass" (what it calls).

`--mode webhook` measures the worker only: a `noop` posted with a webhook, from its request to
its delivery held (the deliveries give way for an hour, so none is tried), the job's own task
run after each request. It is what a webhook task costs over a sync one ("Issue #14, ninth
pass").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODIES = {
    "sync": {"function": "hello", "input": {"name": "Andera"}, "contract": 1},
    # Never delivered (held), and only ever loopback.
    "webhook": {
        "function": "noop",
        "contract": 1,
        "mode": "webhook",
        "webhook": {"url": "http://127.0.0.1:9/hook"},
    },
}
KEY = "bench-key"


class _Null(io.TextIOBase):
    """The log output: lines are rendered, masked and written, to nowhere."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def build_worker(**flags: Any) -> Any:
    """A worker's parts wired as the daemon wires them (`lifecycle.build`), serving the bench
    functions with the bench key, its log lines rendered and written to nowhere; `flags`
    (dotted config keys) are added to or override the defaults."""
    from worker import config, functions, lifecycle
    from worker.logs import LogBuffer, Logging
    from worker.notify import Notifier

    defaults = {
        "auth.auth_key": KEY,
        "worker.functions": ["worker.examples", str(ROOT / "bench" / "functions.py")],
        "load_balancer.websocket_port": 0,
        "worker.slots": 100,
    }
    cfg = config.load(None, environ={}, flags={**defaults, **flags})
    logging = Logging(LogBuffer(cfg.logging.max_lines), _Null())
    logging.configure("info", "json", cfg.secrets(), {})
    return lifecycle.build(cfg, functions.load(cfg.worker.functions), logging, Notifier({}, 0), [])


Served = tuple[Any, Any]  # an application, and what aiohttp's server calls per request


def worker_app(mode: str = "sync") -> Served:
    """The worker's application and its listener's entry (a checkout older than the entry:
    the application's own). In mode webhook its journal is started with the application, and
    its deliveries give way for an hour: every result is held, none is tried."""
    if mode == "webhook":
        from worker.giveway import GiveWay

        built = build_worker(**{"webhook.max_pending": 10**6})
        give_way = built.deliveries.give_way = GiveWay(3600.0, 3600.0)

        async def start(app: Any) -> None:
            await built.journal.start()
            give_way.call(lambda: None)  # its first look: from now on every result waits

        built.app.on_startup.append(start)
    else:
        built = build_worker()
    built.slots.hold("starting", False)
    entry = getattr(built.api, "entry", None)
    return built.app, entry(built.app._handle) if entry is not None else built.app._handle


def baseline_app() -> Served:
    from aiohttp import web

    sys.path.insert(0, str(ROOT / "bench"))
    import baseline

    app = web.Application()
    app.router.add_post("/task", baseline.Baseline(KEY, 100).task)
    return app, app._handle


def request(app: Any, body: bytes) -> Any:
    from aiohttp import streams
    from aiohttp.test_utils import make_mocked_request

    payload = streams.StreamReader(_PROTOCOL, 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(body)
    payload.feed_eof()
    headers = {
        "Authorization": KEY,
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
    }
    made = make_mocked_request("POST", "/task", headers, app=app, payload=payload)
    made._match_info = None  # as aiohttp's server makes it: not routed yet
    return made


_PROTOCOL: Any = None


async def measure(served: Served, count: int, mode: str = "sync") -> dict[str, float]:
    from unittest import mock

    global _PROTOCOL
    _PROTOCOL = mock.Mock(_reading_paused=False)
    body = json.dumps(BODIES[mode]).encode()
    app, handle = served
    if mode == "webhook":
        handle = _with_its_job(handle)
    app.freeze()
    await app.startup()
    response = await handle(request(app, body))
    assert response.status == (202 if mode == "webhook" else 200), response.text
    best = float("inf")
    for _ in range(5):
        batch = [request(app, body) for _ in range(count)]
        gc.collect()
        began = time.process_time()
        for one in batch:
            await handle(one)
        best = min(best, time.process_time() - began)
    figures = await churn(handle, [request(app, body) for _ in range(300)])
    return {"cpu_us": best / count * 1e6, **figures}


def _with_its_job(handle: Any) -> Any:
    """`handle`, then a turn of the loop: the task's job runs (and the one before it is told
    that its asyncio task has ended)."""

    async def handled(one: Any) -> Any:
        response = await handle(one)
        await asyncio.sleep(0)
        return response

    return handled


async def churn(handle: Any, batch: list[Any]) -> dict[str, float]:
    """Per request: Python and C function calls (a profile hook counts them), the peak of
    memory it had allocated at once (tracemalloc), and memory blocks still held after it."""
    for one in batch[:100]:
        await handle(one)
    measured = batch[100:]
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call" or event == "c_call":
            calls += 1

    sys.setprofile(count)
    for one in measured:
        await handle(one)
    sys.setprofile(None)
    gc.collect()
    gc.disable()
    blocks = sys.getallocatedblocks()
    tracemalloc.start()
    peak = 0
    for one in measured:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        await handle(one)
        peak += tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    held = sys.getallocatedblocks() - blocks
    gc.enable()
    n = len(measured)
    return {"calls": calls / n, "peak_kib": peak / n / 1024, "held_blocks": held / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--which", choices=["worker", "baseline"], default="worker")
    parser.add_argument("--mode", choices=["sync", "webhook"], default="sync")
    args = parser.parse_args()
    if args.mode == "webhook" and args.which == "baseline":
        parser.error("--mode webhook measures the worker only")
    import uvloop

    served = worker_app(args.mode) if args.which == "worker" else baseline_app()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(measure(served, args.requests, args.mode))))


if __name__ == "__main__":
    main()
