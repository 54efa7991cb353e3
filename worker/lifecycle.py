"""Startup, reload and stop: the one place that handles signals and decides to exit.

Start: logging, functions, listeners, then READY=1. SIGHUP: re-read the config and apply what
can change live. SIGTERM: drain (no new tasks; running, queued and undelivered work finishes up
to `drain_timeout`), then close the listeners and exit 0. A second SIGTERM or a SIGINT stops
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from worker import __version__, config, functions, jsoncodec
from worker.app import build_app
from worker.errors import ConfigError
from worker.logs import LogBuffer, Logging
from worker.notify import Notifier
from worker.runner import Outcome
from worker.runtime import Runtime

_log = structlog.get_logger("worker.lifecycle")

# Settings read only at startup; a reload that changes them says so instead of ignoring them.
RESTART_ONLY = (
    "http.host",
    "http.port",
    "http.max_body_size",
    "http.openapi",
    "worker.functions",
    "worker.state_dir",
    "logging.format",
    "load_balancer.websocket_port",
)
EXTEND_EVERY = 5.0  # seconds between EXTEND_TIMEOUT_USEC messages while draining
SD_LISTEN_FDS_START = 3
# aiohttp's default of 128 drops SYNs when a load balancer opens hundreds of connections at
# once, and a dropped SYN is retried only a second later (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 1024
GC_YOUNG_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)


class Daemon:
    """One run of the daemon, from config to exit code."""

    def __init__(
        self,
        cfg: config.Config,
        path: Path | None,
        flags: Mapping[str, Any],
        environ: Mapping[str, str],
    ) -> None:
        self.config = cfg
        self.path = path
        self.flags = flags
        self.environ = environ
        self.logging = Logging(LogBuffer(cfg.logging.max_lines))
        self.notifier = Notifier(environ, os.getpid())
        self._stop = asyncio.Event()
        self._now = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self) -> int:
        cfg = self.config
        self.logging.apply(cfg.logging.level, cfg.logging.format, cfg.secrets(), self.environ)
        try:
            registry = functions.load(cfg.worker.functions)
        except functions.LoadError as exc:
            _log.error("cannot start", reason=str(exc))
            return 1
        runtime = Runtime(cfg, registry, self.logging.buffer)
        runtime.restore_maintenance()
        app = build_app(runtime)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
        try:
            # setup() also starts the background parts (their listeners included).
            await runner.setup()
            addresses = await self._listen(runner)
        except OSError as exc:
            _log.error("cannot listen", host=cfg.http.host, port=cfg.http.port, reason=str(exc))
            await runner.cleanup()
            return 1
        self._install_signals(runtime)
        runtime.slots.subscribe(self.notifier.on_slots)
        self._start(self.notifier.watchdog())
        self._log_startup(runtime, addresses)
        # Everything built so far lives as long as the daemon: keep it out of the collector's
        # full passes, which otherwise walk it all every few hundred requests (p99 spikes).
        gc.collect()
        gc.freeze()
        # Each request allocates a few hundred objects; collecting the youngest generation every
        # 700 allocations cost more than the tasks themselves with thousands queued.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
        self.notifier.ready(runtime.slots.state())
        summary: dict[str, int] = {}
        try:
            await self._stop.wait()
            summary = await self._drain(runtime)
        finally:
            for task in self._tasks:
                task.cancel()
            self.notifier.close()
            await runner.cleanup()
        # Last, so that it is the final line whatever the parts logged while closing.
        _log.info("stopped", **summary)
        return 0

    def _start(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, runner: web.AppRunner) -> list[str]:
        """Bind the HTTP listener, or serve on sockets passed by systemd socket activation."""
        inherited = self._inherited_sockets()
        if inherited:
            sites: list[web.BaseSite] = [web.SockSite(runner, sock) for sock in inherited]
        else:
            http = self.config.http
            tcp = web.TCPSite(
                runner, http.host, http.port, reuse_address=True, backlog=LISTEN_BACKLOG
            )
            sites = [tcp]
        for site in sites:
            await site.start()
        return [site.name for site in sites]

    def _inherited_sockets(self) -> list[socket.socket]:
        if self.environ.get("LISTEN_PID") != str(os.getpid()):
            return []
        count = int(self.environ.get("LISTEN_FDS", "0") or 0)
        return [
            socket.socket(fileno=fd)
            for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
        ]

    def _install_signals(self, runtime: Runtime) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._start(self._reload(runtime)))

    def _on_sigterm(self) -> None:
        if self._stop.is_set():
            _log.warning("second SIGTERM: stopping at once")
            self._now.set()
        self._stop.set()

    def _on_sigint(self) -> None:
        _log.warning("SIGINT: stopping at once")
        self._now.set()
        self._stop.set()

    def _log_startup(self, runtime: Runtime, addresses: list[str]) -> None:
        cfg = runtime.config
        _log.info(
            "base-worker started",
            version=__version__,
            loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            json=jsoncodec.ENGINE,
            listening=", ".join(addresses),
            functions=", ".join(runtime.registry.functions),
            slots=cfg.worker.slots,
            max_queue=cfg.worker.max_queue,
            group=cfg.worker.group,
            contract=cfg.worker.contract,
            status=runtime.slots.status,
        )
        if cfg.uses_dev_keys:
            _log.warning(
                "USING DEV-ONLY KEYS FROM config.example.toml: anyone who read the example can "
                "call this worker; set [auth] auth_key and lb_auth_key before exposing it"
            )

    async def _reload(self, runtime: Runtime) -> None:
        self.notifier.reloading()
        old = runtime.config
        try:
            new = config.load(self.path, self.environ, self.flags)
            if self.path is None:
                _log.info("reload: no config file, re-reading the environment only")
        except ConfigError as exc:
            _log.error("reload refused, keeping the running config", reason=str(exc))
            self.notifier.ready(runtime.slots.state())
            return
        needs_restart = [name for name in RESTART_ONLY if _get(old, name) != _get(new, name)]
        runtime.apply(new)
        self.logging.buffer.resize(new.logging.max_lines)
        self.logging.apply(new.logging.level, old.logging.format, new.secrets(), self.environ)
        changed = [
            opt.name for opt in config.options() if _get(old, opt.name) != _get(new, opt.name)
        ]
        _log.info("configuration reloaded", changed=", ".join(changed) or "nothing")
        if needs_restart:
            _log.warning("reload: these settings need a restart", settings=", ".join(needs_restart))
        self.notifier.ready(runtime.slots.state())

    async def _drain(self, runtime: Runtime) -> dict[str, int]:
        """Finish what was accepted, up to the deadline; returns what became of it."""
        timeout = runtime.config.worker.drain_timeout
        runtime.slots.set_status("draining")
        before = runtime.dispatcher.counts.copy()
        self.notifier.stopping(f"draining: {runtime.dispatcher.in_flight} tasks in flight")
        _log.info(
            "draining",
            in_flight=runtime.dispatcher.in_flight,
            queued=runtime.slots.state().queue,
            pending_deliveries=runtime.deliveries.pending,
            timeout=timeout,
        )
        drained = await self._wait_drained(runtime, time.monotonic() + timeout)
        cancelled_now = 0
        if not drained:
            cancelled_now = runtime.dispatcher.cancel_all()
            _log.warning("drain deadline passed, cancelling what is left", tasks=cancelled_now)
            # Let the cancelled tasks answer their clients (503) before the listeners close.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await runtime.dispatcher.wait_done()
        after = runtime.dispatcher.counts - before
        return {
            "completed": sum(after[o] for o in Outcome if o is not Outcome.CANCELLED),
            "cancelled": after[Outcome.CANCELLED],
            "undelivered": runtime.deliveries.abandon(),
        }

    async def _wait_drained(self, runtime: Runtime, deadline: float) -> bool:
        """Wait for tasks and deliveries, telling systemd to extend its stop timeout meanwhile."""
        everything = asyncio.ensure_future(runtime.wait_drained())
        now_task = asyncio.ensure_future(self._now.wait())
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._now.is_set():
                    return False
                self.notifier.extend_stop(min(remaining, EXTEND_EVERY) + EXTEND_EVERY)
                done, _ = await asyncio.wait(
                    {everything, now_task},
                    timeout=min(remaining, EXTEND_EVERY),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if everything in done:
                    return True
        finally:
            everything.cancel()
            now_task.cancel()


def _get(cfg: config.Config, name: str) -> Any:
    section, key = name.split(".")
    return getattr(getattr(cfg, section), key)


def _function_threads_alive() -> bool:
    return any(t.name.startswith("function") and t.is_alive() for t in threading.enumerate())


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's when it is installed (the `fast` extra), else None for asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(cfg: config.Config, path: Path | None, flags: Mapping[str, Any]) -> int:
    """Serve until stopped; returns the exit code."""
    daemon = Daemon(cfg, path, flags, os.environ)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        code = runner.run(daemon.serve())
    if _function_threads_alive():
        # A plain `def` still running cannot be killed, and the interpreter would wait for it
        # at exit forever: leave without waiting, the drain already accounted for it.
        sys.stdout.flush()
        os._exit(code)
    return code
