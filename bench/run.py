"""base-worker against the bare-aiohttp baseline, side by side in one run.

    python -m bench.run            # the full run (about 5 minutes); `make bench`
    python -m bench.run --smoke    # every scenario, tiny sizes (under a minute); `make bench-smoke`
    python -m bench.run --only a,f # some scenarios

Every server listens on 127.0.0.1 only and every load loop is bounded in count and time. Prints
one table (absolute figures, the ratio to the baseline, the target) and writes the raw results
to bench/results/. See docs/performance.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
AUTH_KEY = "bench-key"
AUTH = {"Authorization": AUTH_KEY}
HOST = "127.0.0.1"
HELLO = {"function": "hello", "input": {"name": "Andera"}, "contract": 1}
HELLO_ANSWER = {"success": True, "result": {"message": "Hello Andera!"}}
CHUNK_BYTES = 65536
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
WORKER_SOURCE = ROOT  # --worker-source: measure another checkout's `worker` package instead


@dataclass
class Sizes:
    """How big each scenario is; `--smoke` shrinks everything to exercise the code paths only."""

    duration: float = 8.0  # (a) seconds per wrk run
    rounds: int = 3  # (a), (b), (h) A/B rounds
    # (d)'s bursts last under a second each: single rounds' ratios ranged from 0.26 to 1.70
    # on one tree, so its median takes five.
    webhook_rounds: int = 5
    connections: tuple[int, ...] = (1, 16, 64, 256)
    saturation_seconds: float = 8.0  # (b)
    saturation_connections: int = 512
    service_time: float = 0.01  # (b) seconds each task holds its slot
    # (c): one request lasts 6-15 ms, and single requests read about 1,000 or about 2,500 MB/s
    # on either server as the machine's two cores are shared out; a median of ten followed
    # that split (twelfth pass of issue 14), so it takes thirty.
    stream_requests: int = 30
    stream_warm_up: int = 3  # (c) full requests to each server before the measured ones
    stream_chunks: int = 256  # (c) 16 MiB per request
    webhook_tasks: int = 2000  # (d)
    queued_tasks: int = 10000  # (e)
    hold_seconds: float = 12.0  # (e) how long the slots stay busy while the queue fills
    starts: int = 5  # (f)
    idle_seconds: float = 10.0  # (g)
    journaled_tasks: int = 10000  # (h) tasks in the journal when the worker is killed
    handler_requests: int = 5000  # (a) in-process requests per batch (bench/handler.py)


SMOKE = Sizes(
    duration=1.0,
    rounds=1,
    webhook_rounds=1,
    saturation_seconds=1.0,
    saturation_connections=64,
    stream_requests=2,
    stream_warm_up=1,
    stream_chunks=16,
    webhook_tasks=50,
    queued_tasks=300,
    hold_seconds=3.0,
    starts=1,
    idle_seconds=1.0,
    journaled_tasks=200,
    handler_requests=300,
)


class Skipped(Exception):
    """A scenario the server under test cannot run (e.g. a mode answering 501)."""


class BenchError(Exception):
    """The harness or a server misbehaved: a wrong answer, an error, a lost request."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# --- servers -----------------------------------------------------------------------------------


_SERVERS = itertools.count()  # numbers each Server's notify socket


class Server:
    """One server process (`worker` or `baseline`) with its own NOTIFY_SOCKET and log file."""

    def __init__(
        self, kind: str, tmp: Path, slots: int, max_queue: int = 10000, state_dir: str = ""
    ) -> None:
        self.kind = kind
        self.tmp = tmp
        self.slots = slots
        self.max_queue = max_queue
        self.state_dir = state_dir  # the worker's task journal lives there (h)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.loop = "asyncio"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_after = 0.0
        self.ready_within = 15.0  # seconds from exec to READY=1 before the start fails
        self.log_path = tmp / f"{kind}-{self.port}.log"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Named for this server alone: a port comes round again within a run (f starts ten
        # servers), and binding the path of a closed server's socket fails.
        self._notify_path = str(tmp / f"notify-{next(_SERVERS)}-{self.port}.sock")
        self._notify.bind(self._notify_path)
        self.messages: list[str] = []
        self._ready = threading.Event()
        self._ready_at = 0.0
        self._closed = False
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()

    def command(self, loop: str) -> list[str]:
        if self.kind == "baseline":
            script = str(BENCH / "baseline.py")
            options = f"--port {self.port} --auth-key {AUTH_KEY} --slots {self.slots} --loop {loop}"
            return [sys.executable, script, *options.split()]
        config = self.tmp / f"worker-{self.port}.toml"
        # (e) holds a connection per queued task, past http.max_connections' default of
        # 10,000; written only there, so that --worker-source still runs older trees.
        connections = self.slots + self.max_queue + 100
        bound = f"max_connections = {connections}\n" if self.max_queue > 10000 else ""
        journal = f'state_dir = "{self.state_dir}"\n' if self.state_dir else ""
        config.write_text(
            "[worker]\n"
            f"slots = {self.slots}\nmax_queue = {self.max_queue}\n{journal}"
            f'functions = ["worker.examples", "{BENCH / "functions.py"}"]\n'
            f'[http]\nhost = "{HOST}"\nport = {self.port}\n{bound}'
            f'[auth]\nauth_key = "{AUTH_KEY}"\n'
            "[load_balancer]\nwebsocket_port = 0\n"
            '[logging]\nlevel = "info"\nformat = "json"\n'
        )
        return [sys.executable, "-m", "worker", "--config", str(config)]

    def start(self, loop: str = "asyncio", env: dict[str, str] | None = None) -> float:
        """Start and wait for READY=1; returns the seconds from exec to READY=1."""
        environ = {**os.environ, "NOTIFY_SOCKET": self._notify_path, **(env or {})}
        environ.pop("WATCHDOG_PID", None)
        self.messages = []
        self._ready.clear()
        with self.log_path.open("wb") as log:
            began = time.perf_counter()
            self.proc = subprocess.Popen(
                self.command(loop),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
                cwd=WORKER_SOURCE if self.kind == "worker" else ROOT,
            )
        if not self._ready.wait(self.ready_within):
            self.stop()
            within = f"{self.ready_within:g}"
            raise BenchError(f"{self.kind} sent no READY=1 within {within} s: {self.log_tail()}")
        self.ready_after = self._ready_at - began
        self.loop = loop if self.kind == "baseline" else self._worker_loop()
        return self.ready_after

    def _read_notify(self) -> None:
        """Read every sd_notify datagram as systemd would: a reader that falls behind would
        fill the socket and stall the sender."""
        self._notify.settimeout(0.2)
        while not self._closed:
            try:
                data = self._notify.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if b"READY=1" in data and not self._ready.is_set():
                self._ready_at = time.perf_counter()
                self._ready.set()
            self.messages.append(data.decode(errors="replace"))

    def _worker_loop(self) -> str:
        # The start-up line is written at the end of the loop turn that sent READY=1, so it
        # may not be in the file yet when READY=1 arrives: look for it for a while.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("event") == "base-worker started":
                        return str(entry.get("loop", "asyncio"))
            time.sleep(0.02)
        raise BenchError(f"worker wrote no start-up line: {self.log_tail()}")

    def rss(self) -> int:
        """Resident set size in bytes."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def log_tail(self, lines: int = 5) -> str:
        return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def task_lines(self) -> int:
        """How many per-task summary lines the worker wrote (it must write one per task)."""
        count = 0
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"event": "task"' in line or '"event":"task"' in line:
                count += 1
        return count

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        self._closed = True
        self._reader.join()
        self._notify.close()
        Path(self._notify_path).unlink(missing_ok=True)


@contextlib.contextmanager
def running(
    tmp: Path, kind: str, slots: int, loop: str, max_queue: int = 10000, state_dir: str = ""
) -> Iterator[Server]:
    server = Server(kind, tmp, slots, max_queue, state_dir)
    try:
        server.start(loop)
        yield server
    finally:
        server.close()


# --- load generators ---------------------------------------------------------------------------


def wrk(url: str, body: dict[str, Any], connections: int, seconds: float) -> dict[str, Any]:
    """One bounded wrk run (one thread: the other core is the server's); its JSON summary."""
    env = {**os.environ, "BENCH_BODY": json.dumps(body), "BENCH_AUTH": AUTH_KEY}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"]
    command += ["-s", str(BENCH / "post.lua"), f"{url}/task"]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            if not result["requests"]:
                raise BenchError(f"no request answered in {seconds:g} s: {result}")
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            result["errors"] = (
                sum(
                    result[k]
                    for k in ("connect_errors", "read_errors", "write_errors", "status_errors")
                )
                + result["timeouts"]
            )
            return result
    raise BenchError(f"wrk printed no summary: {done.stdout[-500:]} {done.stderr[-500:]}")


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(f"{url}/task", json=body, headers=AUTH) as response:
        data = await response.read()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data


async def check_answer(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, url, HELLO)
    if status != 200 or answer != HELLO_ANSWER:
        raise BenchError(f"{url} answered {status} {answer!r} to hello")


def connector(limit: int) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=limit, force_close=False, keepalive_timeout=60)


# --- scenarios ---------------------------------------------------------------------------------


@dataclass
class Context:
    tmp: Path
    sizes: Sizes
    loop: str = "asyncio"
    rows: list[list[Any]] = field(default_factory=list)

    def row(
        self, scenario: str, metric: str, worker: Any, baseline: Any = None, target: str = ""
    ) -> None:
        self.rows.append([scenario, metric, worker, baseline, target])


def ab_order(rounds: int) -> list[str]:
    return ["worker", "baseline"] * rounds


def handler_figures(kind: str, requests: int) -> dict[str, float]:
    """bench/handler.py for one side: CPU µs, function calls and peak KiB allocated per task."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "handler.py"), "--which", kind, "--requests", str(requests)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(WORKER_SOURCE)},
        cwd=WORKER_SOURCE,
        check=True,
    )
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


async def scenario_a(ctx: Context) -> dict[str, Any]:
    """Sync `hello`, slots 100, wrk at 1/16/64/256 connections, A/B/A/B."""
    sizes = ctx.sizes
    raw: dict[str, Any] = {}
    with (
        running(ctx.tmp, "worker", 100, ctx.loop) as worker,
        running(ctx.tmp, "baseline", 100, ctx.loop) as baseline,
    ):
        servers = {"worker": worker, "baseline": baseline}
        for server in servers.values():
            await check_answer(server.url)
            wrk(server.url, HELLO, 64, min(2.0, sizes.duration))  # warm-up, not recorded
        before = worker.task_lines()
        requests = 0
        for connections in sizes.connections:
            runs: dict[str, list[dict[str, Any]]] = {"worker": [], "baseline": []}
            for kind in ab_order(sizes.rounds):
                cpu = servers[kind].cpu_seconds()
                result = wrk(servers[kind].url, HELLO, connections, sizes.duration)
                # CPU time per answered request: robust to a noisy machine, unlike req/s.
                used = servers[kind].cpu_seconds() - cpu
                result["cpu_us_per_request"] = used / result["requests"] * 1e6
                if result["errors"]:
                    raise BenchError(f"(a) {kind} at {connections} connections: {result}")
                runs[kind].append(result)
                if kind == "worker":
                    requests += result["requests"]
            raw[str(connections)] = runs
            summary = {
                kind: {
                    "rps": statistics.median(r["rps"] for r in results),
                    "p50_ms": statistics.median(r["p50_us"] for r in results) / 1000,
                    "p99_ms": statistics.median(r["p99_us"] for r in results) / 1000,
                    "cpu_us": statistics.median(r["cpu_us_per_request"] for r in results),
                }
                for kind, results in runs.items()
            }
            raw[str(connections)]["median"] = summary
            w, b = summary["worker"], summary["baseline"]
            at64 = connections == 64
            ctx.row("a", f"c={connections} req/s", w["rps"], b["rps"], ">= 0.75" if at64 else "")
            ctx.row("a", f"c={connections} p50 ms", w["p50_ms"], b["p50_ms"])
            ctx.row("a", f"c={connections} CPU us/request", w["cpu_us"], b["cpu_us"])
            ctx.row(
                "a", f"c={connections} p99 ms", w["p99_ms"], b["p99_ms"], "<= 1.5" if at64 else ""
            )
        await asyncio.sleep(0.2)
        raw["summary_lines"] = worker.task_lines() - before
        raw["wrk_worker_requests"] = requests
    # The handler path in-process (bench/handler.py): the churn per task, which wrk cannot see.
    churn = {kind: handler_figures(kind, sizes.handler_requests) for kind in ("worker", "baseline")}
    raw["in_process"] = churn
    w, b = churn["worker"], churn["baseline"]
    ctx.row("a", "in-process CPU us/task", w["cpu_us"], b["cpu_us"])
    ctx.row("a", "in-process calls/task", w["calls"], b["calls"])
    ctx.row("a", "in-process peak KiB/task", w["peak_kib"], b["peak_kib"])
    # wrk counts answered requests only; the worker may log a few more that wrk cut off.
    if raw["summary_lines"] < requests:
        raise BenchError(f"(a) {requests} answered but only {raw['summary_lines']} log lines")
    return raw


class Pool:
    """`count` keep-alive connections, open before the measurement, as a load balancer holds them.

    Opened in sessions of BATCH: thousands of connects at once overflow the listen backlog
    (a dropped SYN is retried only after a second or more), and one big session would reuse
    the first batch's connections instead of opening the next. Request i goes to session
    i // BATCH, so `count` concurrent requests use exactly the connections opened here.
    """

    BATCH = 100

    def __init__(self, count: int) -> None:
        sizes = [min(self.BATCH, count - start) for start in range(0, count, self.BATCH)]
        self.sessions = [aiohttp.ClientSession(connector=connector(size)) for size in sizes]
        self.sizes = sizes

    async def open(self, url: str) -> None:
        async def one(session: aiohttp.ClientSession) -> None:
            async with session.get(f"{url}/health") as response:
                await response.read()

        for session, size in zip(self.sessions, self.sizes, strict=True):
            await asyncio.gather(*(one(session) for _ in range(size)))

    def session(self, index: int) -> aiohttp.ClientSession:
        return self.sessions[index // self.BATCH]

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()


async def saturate(url: str, sizes: Sizes) -> dict[str, Any]:
    """`saturation_connections` clients, each posting 10 ms tasks back to back, for a while.

    The connections are opened first, in batches: a burst of hundreds of connects overflows a
    listen backlog, and the SYNs retried a second later would be measured as queueing.
    """
    body = {"function": "sleeper", "input": {"seconds": sizes.service_time}, "contract": 1}
    records: list[tuple[float, float, int]] = []  # sent, answered, start order
    errors: list[str] = []
    sent = 0
    pool = Pool(sizes.saturation_connections)
    try:
        await pool.open(url)
        deadline = time.perf_counter() + sizes.saturation_seconds

        async def client(session: aiohttp.ClientSession) -> None:
            nonlocal sent
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                sent += 1
                try:
                    status, answer = await post(session, url, body)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors.append(repr(exc))
                    continue
                if status != 200:
                    errors.append(f"{status} {answer!r}"[:200])
                    continue
                records.append((began, time.perf_counter(), answer["result"]["started"]))

        clients = [client(pool.session(i)) for i in range(sizes.saturation_connections)]
        async with asyncio.timeout(sizes.saturation_seconds + 60):
            await asyncio.gather(*clients)
    finally:
        await pool.close()
    began = min(r[0] for r in records)
    ended = max(r[1] for r in records)
    latencies = [r[1] - r[0] for r in records]
    # FIFO: rank by send time against rank by start order; a fair queue keeps them close.
    by_sent = sorted(range(len(records)), key=lambda i: records[i][0])
    start_rank = {i: rank for rank, i in enumerate(sorted(by_sent, key=lambda i: records[i][2]))}
    displacement = [abs(start_rank[i] - rank) for rank, i in enumerate(by_sent)]
    return {
        "sent": sent,
        "answered": len(records),
        "errors": len(errors),
        "error_samples": errors[:5],
        "lost": sent - len(records) - len(errors),
        "rps": len(records) / (ended - began),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
        "fifo_displacement_p99": percentile([float(d) for d in displacement], 99),
        "fifo_displacement_max": max(displacement),
    }


async def scenario_b(ctx: Context) -> dict[str, Any]:
    """Saturation: slots 10, 512 connections of 10 ms tasks; the queue absorbs the excess."""
    sizes = ctx.sizes
    slots = 10
    raw: dict[str, Any] = {"worker": [], "baseline": []}
    with (
        running(ctx.tmp, "worker", slots, ctx.loop) as worker,
        running(ctx.tmp, "baseline", slots, ctx.loop) as baseline,
    ):
        servers = {"worker": worker, "baseline": baseline}
        for kind in ab_order(sizes.rounds):
            raw[kind].append(await saturate(servers[kind].url, sizes))
    w = {
        k: statistics.median(r[k] for r in raw["worker"])
        for k in raw["worker"][0]
        if k != "error_samples"
    }
    b = {
        k: statistics.median(r[k] for r in raw["baseline"])
        for k in raw["baseline"][0]
        if k != "error_samples"
    }
    # With every slot busy, a task waits for the queue ahead of it: connections / slots services.
    expected_ms = sizes.saturation_connections / slots * sizes.service_time * 1000
    raw["expected_wait_ms"] = expected_ms
    errors = sum(r["errors"] + r["lost"] for r in raw["worker"])
    ctx.row(
        "b", "errors + lost", errors, sum(r["errors"] + r["lost"] for r in raw["baseline"]), "0"
    )
    ctx.row("b", "req/s", w["rps"], b["rps"])
    ctx.row("b", "p50 ms", w["p50_ms"], b["p50_ms"])
    ctx.row("b", f"p99 ms (queue depth says {expected_ms:.0f})", w["p99_ms"], b["p99_ms"])
    ctx.row("b", "max ms", w["max_ms"], b["max_ms"])
    ctx.row("b", "FIFO displacement p99", w["fifo_displacement_p99"], b["fifo_displacement_p99"])
    if errors:
        raise BenchError(f"(b) worker errors: {raw['worker'][0]['error_samples']}")
    return raw


async def stream_once(url: str, chunks: int) -> tuple[float, float, int]:
    """One stream request: (first-chunk seconds, total seconds, bytes)."""
    body = {"function": "chunks", "input": {"count": chunks}, "contract": 1, "mode": "stream"}
    async with aiohttp.ClientSession() as session:
        began = time.perf_counter()
        async with session.post(f"{url}/task", json=body, headers=AUTH) as response:
            if response.status == 501:
                raise Skipped("mode not available")
            if response.status != 200:
                raise BenchError(f"stream answered {response.status}: {await response.text()}")
            first = None
            size = 0
            async for data in response.content.iter_any():
                if first is None:
                    first = time.perf_counter() - began
                size += len(data)
        total = time.perf_counter() - began
    return first or total, total, size


async def scenario_c(ctx: Context) -> dict[str, Any]:
    """Stream: first-chunk latency, MB/s and CPU per MB of a function yielding 64 KiB chunks."""
    sizes = ctx.sizes
    raw: dict[str, Any] = {"worker": [], "baseline": []}

    def cpu_ns(server: Server) -> int:
        # Nanoseconds on a CPU, all threads: /proc's clock ticks (10 ms) are too coarse for
        # requests of a few milliseconds each.
        assert server.proc is not None
        total = 0
        for thread in Path(f"/proc/{server.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((thread / "schedstat").read_text().split()[0])
        return total

    with running(ctx.tmp, "worker", 10, ctx.loop) as worker:
        # The worker's startup line names its loop; it may be written after READY=1, so it is
        # read again here, once a request has passed, for the baseline to run on the same one.
        await stream_once(worker.url, 1)
        loop = worker._worker_loop()
        with running(ctx.tmp, "baseline", 10, loop) as baseline:
            servers = {"worker": worker, "baseline": baseline}
            for kind in ab_order(sizes.stream_warm_up):
                await stream_once(servers[kind].url, sizes.stream_chunks)
            for kind in ab_order(sizes.stream_requests):
                server = servers[kind]
                before = cpu_ns(server)
                first, total, size = await stream_once(server.url, sizes.stream_chunks)
                cpu = cpu_ns(server) - before
                if size != sizes.stream_chunks * CHUNK_BYTES:
                    raise BenchError(f"(c) {kind} streamed {size} bytes")
                raw[kind].append(
                    {"first_chunk_s": first, "total_s": total, "bytes": size, "cpu_ns": cpu}
                )
    summary = {
        kind: {
            "first_ms": statistics.median(r["first_chunk_s"] for r in runs) * 1000,
            "mb_s": statistics.median(r["bytes"] / r["total_s"] for r in runs) / 1e6,
            "cpu_us_mb": sum(r["cpu_ns"] for r in runs)
            / 1e3
            / (sum(r["bytes"] for r in runs) / 1e6),
        }
        for kind, runs in raw.items()
    }
    raw["loop"] = loop
    ctx.row("c", "first chunk ms", summary["worker"]["first_ms"], summary["baseline"]["first_ms"])
    ctx.row("c", "MB/s", summary["worker"]["mb_s"], summary["baseline"]["mb_s"], ">= 0.9")
    worker_cpu, baseline_cpu = summary["worker"]["cpu_us_mb"], summary["baseline"]["cpu_us_mb"]
    ctx.row("c", "server CPU us per MB", worker_cpu, baseline_cpu)
    return raw


class Receiver:
    """A local webhook receiver: counts deliveries and when the last one came."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.last = 0.0
        self.expected = 0
        self.all_in = asyncio.Event()
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/hook"

    async def hook(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.last = time.perf_counter()
        if len(self.bodies) >= self.expected:
            self.all_in.set()
        return web.Response(text="ok")

    async def reached(self, count: int) -> None:
        self.expected = count
        if len(self.bodies) < count:
            self.all_in.clear()
            await self.all_in.wait()

    @contextlib.asynccontextmanager
    async def serving(self) -> Any:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, self.port).start()
        try:
            yield self
        finally:
            await runner.cleanup()


async def webhooks(url: str, count: int) -> dict[str, Any]:
    receiver = Receiver()
    body = {"function": "noop", "contract": 1, "mode": "webhook", "webhook": {"url": receiver.url}}
    async with receiver.serving(), aiohttp.ClientSession(connector=connector(64)) as session:
        status, _ = await post(session, url, body)
        if status == 501:
            raise Skipped("mode not available")
        await receiver.reached(1)
        receiver.bodies.clear()
        receiver.expected = count + 1
        began = time.perf_counter()
        async with asyncio.timeout(120):
            accepted = await post_all(session, url, body, count, 202, "webhook")
            accepted_at = time.perf_counter()
            await receiver.reached(count)
    first = receiver.bodies[0]
    if not {"task_id", "function", "success", "result"} <= set(first):
        raise BenchError(f"(d) delivery body lacks fields: {first!r}")
    return {
        "tasks": count,
        "accepted": accepted,
        "delivered": len(receiver.bodies),
        "accepted_per_s": accepted / (accepted_at - began),
        "delivered_per_s": len(receiver.bodies) / (receiver.last - began),
    }


async def sync_requests(url: str, count: int) -> dict[str, Any]:
    """`count` no-op tasks in mode sync from 64 connections, as (d) posts its webhook tasks."""
    body = {"function": "noop", "contract": 1}
    async with aiohttp.ClientSession(connector=connector(64)) as session:
        began = time.perf_counter()
        async with asyncio.timeout(120):
            answered = await post_all(session, url, body, count, 200, "sync noop")
        elapsed = time.perf_counter() - began
    return {"tasks": count, "answered": answered, "per_s": answered / elapsed}


async def post_all(
    session: aiohttp.ClientSession, url: str, body: Any, count: int, expected: int, what: str
) -> int:
    """`count` posts of `body` from 64 clients sharing `session`, each answered `expected`."""
    pending = iter(range(count))
    answered = 0

    async def client() -> None:
        nonlocal answered
        for _ in pending:
            status, answer = await post(session, url, body)
            if status != expected:
                raise BenchError(f"(d) {what} answered {status} {answer!r}")
            answered += 1

    await asyncio.gather(*(client() for _ in range(64)))
    return answered


async def scenario_d(ctx: Context) -> dict[str, Any]:
    """Webhook: accepted/s and delivered/s of no-op tasks to a local receiver.

    Each round runs the worker, the baseline and the worker's own sync rate back to back; the
    table shows the medians, and the target the median of each round's own ratio (one burst
    lasts under a second, so a single one follows the machine's other load)."""
    raw: dict[str, Any] = {"worker": [], "baseline": [], "worker_sync": [], "ratios": []}
    count = ctx.sizes.webhook_tasks
    with (
        running(ctx.tmp, "worker", 100, ctx.loop) as worker,
        running(ctx.tmp, "baseline", 100, ctx.loop) as baseline,
    ):
        servers = {"worker": worker, "baseline": baseline}
        for _ in range(ctx.sizes.webhook_rounds):
            for kind in ab_order(1):
                before = servers[kind].cpu_seconds()
                run = await webhooks(servers[kind].url, count)
                run["cpu_us_per_task"] = (servers[kind].cpu_seconds() - before) / count * 1e6
                raw[kind].append(run)
            # The worker's own sync rate for the same function, same client: (d)'s target.
            before = worker.cpu_seconds()
            sync = await sync_requests(worker.url, count)
            sync["cpu_us_per_task"] = (worker.cpu_seconds() - before) / count * 1e6
            raw["worker_sync"].append(sync)
            raw["ratios"].append(raw["worker"][-1]["accepted_per_s"] / sync["per_s"])

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in raw[kind])

    for label, key in [
        ("accepted/s", "accepted_per_s"),
        ("delivered/s", "delivered_per_s"),
        ("CPU us/task, accept to delivery", "cpu_us_per_task"),
    ]:
        ctx.row("d", label, median("worker", key), median("baseline", key))
    ctx.row("d", "worker's sync req/s, same function", median("worker_sync", "per_s"))
    ctx.row("d", "  worker's sync CPU us/task", median("worker_sync", "cpu_us_per_task"))
    ratio = statistics.median(raw["ratios"])
    ctx.row("d", "  accepted/s / sync req/s, per round", ratio, None, ">= 0.9")
    return raw


async def health_slots(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(f"{url}/health", headers=AUTH) as response:
        slots: dict[str, int] = (await response.json())["slots"]
        return slots


async def queue_run(server: Server, count: int, hold: float | None) -> dict[str, Any]:
    """Fire `count` no-op tasks at once, optionally behind `hold` seconds of busy slots."""
    noop = {"function": "noop", "contract": 1}
    sleeper = {"function": "sleeper", "input": {"seconds": hold}, "contract": 1}
    holds_count = server.slots if hold is not None else 0
    pool = Pool(count + holds_count)
    result: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as probe, asyncio.timeout(180):
            await pool.open(server.url)
            await asyncio.sleep(0.5)
            result["rss_connected"] = server.rss()
            holds: list[asyncio.Task[tuple[int, Any]]] = []
            released: list[float] = []
            if hold is not None:
                for i in range(holds_count):
                    holds.append(asyncio.create_task(post(pool.session(i), server.url, sleeper)))
                holds[0].add_done_callback(lambda _: released.append(time.perf_counter()))
                # Polling another process's /health: there is no event to wait on.
                while (await health_slots(probe, server.url))["used"] < server.slots:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            fired = time.perf_counter()
            cpu = server.cpu_seconds(), time.process_time()
            tasks = [
                asyncio.create_task(post(pool.session(holds_count + i), server.url, noop))
                for i in range(count)
            ]
            queued_at = None
            if hold is not None:
                while (await health_slots(probe, server.url))["queue"] < count and not released:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                queued_at = time.perf_counter()
                result["fill_cpu_s"] = {
                    "server": server.cpu_seconds() - cpu[0],
                    "load_generator": time.process_time() - cpu[1],
                }
                result["rss_queued"] = server.rss()
                result["queued_before_release"] = not released
            answers = await asyncio.gather(*tasks)
            last = time.perf_counter()
            if holds:
                await asyncio.gather(*holds)
    finally:
        await pool.close()
    bad = [a for a in answers if a[0] != 200]
    if bad:
        raise BenchError(f"(e) {len(bad)} of {count} no-op tasks failed, e.g. {bad[0]!r}")
    result["total_s"] = last - fired
    if queued_at is not None:
        release = released[0]
        result["fill_s"] = queued_at - fired
        result["drain_after_release_s"] = last - release
        # The time spent working on the tasks: everything but the wait for the held slots.
        result["work_s"] = result["total_s"] - max(0.0, release - queued_at)
    return result


async def scenario_e(ctx: Context) -> dict[str, Any]:
    """10,000 tasks queued at once behind busy slots: RSS per queued task, time to drain."""
    count = ctx.sizes.queued_tasks
    with running(ctx.tmp, "worker", 10, ctx.loop, max_queue=count + 100) as worker:
        rss_idle = worker.rss()
        queued = await queue_run(worker, count, ctx.sizes.hold_seconds)
    with running(ctx.tmp, "worker", count + 10, ctx.loop, max_queue=count + 100) as worker:
        direct = await queue_run(worker, count, None)
    per_task = (queued["rss_queued"] - queued["rss_connected"]) / count
    with_connection = (queued["rss_queued"] - rss_idle) / count
    ratio = queued["work_s"] / direct["total_s"]
    raw = {
        "tasks": count,
        "rss_idle": rss_idle,
        "queued": queued,
        "direct": direct,
        "rss_per_queued_task": per_task,
        "rss_per_queued_task_with_connection": with_connection,
        "drain_ratio": ratio,
    }
    ctx.row("e", "RSS KiB per queued task", per_task / 1024, None, "<= 8")
    ctx.row("e", "  same, counting its connection", with_connection / 1024)
    ctx.row("e", f"s to run {count} queued behind 10 slots", queued["work_s"])
    ctx.row("e", f"s to run {count} with {count} slots", direct["total_s"])
    ctx.row("e", "queued / direct", ratio, None, "<= 1.5")
    if not queued["queued_before_release"]:
        raise BenchError("(e) the slots were released before the queue was full: raise hold")
    return raw


async def scenario_f(ctx: Context) -> dict[str, Any]:
    """Start to READY=1, and RSS once idle."""
    raw: dict[str, Any] = {"worker": [], "baseline": []}
    for kind in ab_order(ctx.sizes.starts):
        server = Server(kind, ctx.tmp, 10)
        try:
            ready = server.start(ctx.loop)
            await check_answer(server.url)
            await asyncio.sleep(0.5)
            raw[kind].append({"ready_s": ready, "rss": server.rss()})
        finally:
            server.close()
    w = {k: statistics.median(r[k] for r in raw["worker"]) for k in ("ready_s", "rss")}
    b = {k: statistics.median(r[k] for r in raw["baseline"]) for k in ("ready_s", "rss")}
    ctx.row("f", "exec to READY=1 s", w["ready_s"], b["ready_s"], "<= 1 s")
    ctx.row("f", "idle RSS MiB", w["rss"] / 2**20, b["rss"] / 2**20, "<= 60 MiB")
    return raw


async def scenario_g(ctx: Context) -> dict[str, Any]:
    """Idle CPU over a while, with the systemd watchdog on (a ping every second)."""
    raw: dict[str, Any] = {}
    for kind in ("worker", "baseline"):
        server = Server(kind, ctx.tmp, 10)
        try:
            server.start(ctx.loop, env={"WATCHDOG_USEC": "2000000"})
            await asyncio.sleep(0.5)
            before = server.cpu_seconds()
            await asyncio.sleep(ctx.sizes.idle_seconds)
            used = server.cpu_seconds() - before
            raw[kind] = {"cpu_s": used, "cpu_percent": used / ctx.sizes.idle_seconds * 100}
        finally:
            server.close()
    ctx.row(
        "g",
        f"idle CPU % over {ctx.sizes.idle_seconds:g} s",
        raw["worker"]["cpu_percent"],
        raw["baseline"]["cpu_percent"],
        "< 1 %",
    )
    return raw


async def journal_recovery(server: Server, count: int) -> dict[str, Any]:
    """Journal `count` webhook tasks behind busy slots, kill -9, start again: seconds from exec
    to READY=1 and to every task back in the queue."""
    receiver = Receiver()
    hold = {"function": "sleeper", "input": {"seconds": 60}, "contract": 1, "mode": "webhook"}
    async with receiver.serving(), aiohttp.ClientSession(connector=connector(64)) as session:
        hold["webhook"] = {"url": receiver.url}
        pending = iter(range(count))

        async def client() -> None:
            for _ in pending:
                status, answer = await post(session, server.url, hold)
                if status != 202:
                    raise BenchError(f"(h) webhook answered {status} {answer!r}")

        async with asyncio.timeout(300):
            await asyncio.gather(*(client() for _ in range(64)))
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        server.proc = None
        began = time.perf_counter()
        ready = server.start(server.loop)
        # The tasks that were running come back as interrupted; the others are in line again.
        waiting = count - server.slots

        async def readmitted() -> int:
            slots = await health_slots(session, server.url)
            return slots["used"] + slots["queue"]

        async with asyncio.timeout(120):
            # Polling another process's /health: there is no event to wait on.
            while await readmitted() < waiting:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        readmitted = time.perf_counter() - began
    return {"tasks": count, "ready_s": ready, "readmitted_s": readmitted}


async def scenario_h(ctx: Context) -> dict[str, Any]:
    """The task journal: webhook accepted/s with it and without, and kill -9 recovery.

    Each round runs the journaling worker, then the one without; the table shows the medians,
    and the target the median of each round's own ratio (as in (d): one burst lasts under a
    second)."""
    raw: dict[str, Any] = {"on": [], "off": [], "ratios": []}
    count = ctx.sizes.webhook_tasks
    journal = ctx.tmp / "journal"
    with (
        running(ctx.tmp, "worker", 100, ctx.loop, state_dir=str(journal)) as durable,
        running(ctx.tmp, "worker", 100, ctx.loop) as memory,
    ):
        for _ in range(ctx.sizes.rounds):
            raw["on"].append(await webhooks(durable.url, count))
            raw["off"].append(await webhooks(memory.url, count))
            raw["ratios"].append(raw["on"][-1]["accepted_per_s"] / raw["off"][-1]["accepted_per_s"])
    big = ctx.sizes.journaled_tasks
    with running(
        ctx.tmp, "worker", 10, ctx.loop, max_queue=big + 100, state_dir=str(ctx.tmp / "journal2")
    ) as worker:
        recovery = await journal_recovery(worker, big)
    on, off = (statistics.median(r["accepted_per_s"] for r in raw[kind]) for kind in ("on", "off"))
    ctx.row("h", "accepted/s, journal on / off", on, off)
    ctx.row("h", "  journal on / off, per round", statistics.median(raw["ratios"]), None, ">= 0.5")
    ctx.row("h", f"kill -9, {big} journaled: exec to READY=1 s", recovery["ready_s"])
    ctx.row("h", "  exec to all queued again s", recovery["readmitted_s"], None, "< 2 s")
    raw["recovery"] = recovery
    return raw


SCENARIOS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "a": scenario_a,
    "b": scenario_b,
    "c": scenario_c,
    "d": scenario_d,
    "e": scenario_e,
    "f": scenario_f,
    "g": scenario_g,
    "h": scenario_h,
}


# --- report ------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if value >= 1 else f"{value:.3g}"
    return str(value)


def table(rows: list[list[Any]]) -> str:
    header = ["", "metric", "base-worker", "baseline", "ratio", "target"]
    lines = [header]
    for scenario, metric, worker, baseline, target in rows:
        ratio = ""
        if isinstance(worker, int | float) and isinstance(baseline, int | float) and baseline:
            ratio = f"{worker / baseline:.2f}"
        lines.append([scenario, metric, fmt(worker), fmt(baseline), ratio, target])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def git_commit() -> str:
    command = ["git", "rev-parse", "--short", "HEAD"]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT).stdout.strip()


def detect_loop(tmp: Path) -> str:
    """The loop the worker picks for itself; the baseline then runs on the same one."""
    server = Server("worker", tmp, 1)
    try:
        server.start()
        return server.loop
    finally:
        server.close()


async def run(names: list[str], sizes: Sizes, smoke: bool) -> int:
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-") as directory:
        tmp = Path(directory)
        ctx = Context(tmp, sizes, detect_loop(tmp))
        results: dict[str, Any] = {}
        passed = failed = skipped = 0
        for name in names:
            began = time.perf_counter()
            print(f"bench: ({name}) {SCENARIOS[name].__doc__.splitlines()[0]}", flush=True)
            try:
                results[name] = await SCENARIOS[name](ctx)
                passed += 1
            except Skipped as exc:
                results[name] = {"skipped": str(exc)}
                ctx.row(name, f"skipped: {exc}", None)
                skipped += 1
            except (BenchError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                traceback.print_exc(file=sys.stderr)
                results[name] = {"error": repr(exc)}
                ctx.row(name, f"FAILED: {exc}"[:100], None)
                failed += 1
            results[name]["seconds"] = time.perf_counter() - began
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "smoke": smoke,
        "loop": ctx.loop,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "cpus": os.cpu_count(),
        "sizes": sizes.__dict__,
        "commit": git_commit(),
    }
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{'smoke' if smoke else 'bench'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"meta": meta, "rows": ctx.rows, "results": results}, indent=2))
    print(f"\nevent loop: {ctx.loop} (both servers); wrk -t1; raw results: {out.relative_to(ROOT)}")
    print(table(ctx.rows))
    print(f"bench{'-smoke' if smoke else ''}: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the harness only")
    parser.add_argument("--only", default="abcdefgh", help="scenarios to run, e.g. a,f")
    parser.add_argument("--duration", type=float, help="seconds per wrk run in (a)")
    parser.add_argument("--rounds", type=int, help="A/B rounds in (a), (b), (d) and (h)")
    parser.add_argument("--connections", help="(a)'s connection counts, e.g. 64 or 16,64")
    parser.add_argument(
        "--worker-source", type=Path, help="run `python -m worker` from this checkout instead"
    )
    parser.add_argument("--show", type=Path, help="print the table of a results file and exit")
    args = parser.parse_args()
    if args.show:
        print(table(json.loads(args.show.read_text())["rows"]))
        return
    if args.worker_source:
        global WORKER_SOURCE
        WORKER_SOURCE = args.worker_source.resolve()
    sizes = SMOKE if args.smoke else Sizes()
    if args.duration:
        sizes.duration = args.duration
    if args.rounds:
        sizes.rounds = sizes.webhook_rounds = args.rounds
    if args.connections:
        sizes.connections = tuple(int(n) for n in args.connections.split(","))
    names = [n for n in args.only.replace(",", "") if n in SCENARIOS]
    factory = None
    with contextlib.suppress(ImportError):
        import uvloop  # the load generators run faster on it; the servers pick their own

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        sys.exit(runner.run(run(names, sizes, args.smoke)))


if __name__ == "__main__":
    main()
