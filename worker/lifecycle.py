"""The life of the process: build the parts, start them, serve, reload, drain, stop.

This is the one module that knows every part and their order, handles signals and decides to
exit. Start: logging, functions, then each part in order (the HTTP listener last), then READY=1.
SIGHUP: re-read the config; every part checks it, then every part applies it. SIGTERM: drain
(no new tasks; running, queued and undelivered work finishes up to `drain_timeout`), then stop
the parts in reverse and exit 0. A second SIGTERM or a SIGINT stops at once.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from worker import __version__, config, functions, jsoncodec
from worker.context import Mode
from worker.errors import ConfigError
from worker.functions import Registry
from worker.http import Answer, Api
from worker.journal import Journal
from worker.lb_client import OutboundClient
from worker.lb_server import InboundServer
from worker.logs import LogBuffer, Logging
from worker.maintenance import Maintenance
from worker.metrics import Metrics
from worker.notify import Notifier, StatusLine, Watchdog
from worker.outcomes import Outcome
from worker.parts import (
    Part,
    ReloadRefused,
    StartFailed,
    apply_all,
    health_of,
    start_all,
    stop_all,
)
from worker.runner import Runner
from worker.server import HttpServer, raise_open_file_limit
from worker.services import Services
from worker.slots import SlotManager
from worker.streaming import StreamMode
from worker.sync import SyncMode
from worker.tasks import Dispatcher
from worker.webhooks import Deliveries, WebhookMode

_log = structlog.get_logger("worker.lifecycle")

EXTEND_EVERY = 5.0  # seconds between EXTEND_TIMEOUT_USEC messages while draining
ANSWER_CANCELLED = 2.0  # seconds the cancelled tasks get to answer their clients (503)
SD_LISTEN_FDS_START = 3
JOURNAL_FILE = "tasks.sqlite3"  # in worker.state_dir
GC_YOUNG_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)


@dataclass(frozen=True)
class Worker:
    """Every long-lived object of one run, wired so that each receives only what it uses."""

    registry: Registry
    logging: Logging
    slots: SlotManager
    runner: Runner
    dispatcher: Dispatcher
    journal: Journal
    deliveries: Deliveries
    webhooks: WebhookMode
    maintenance: Maintenance
    api: Api
    app: web.Application
    status_line: StatusLine
    services: Services
    metrics: Metrics
    watchdog: Watchdog
    inbound: InboundServer
    outbound: OutboundClient
    listener: HttpServer

    @property
    def own_ports(self) -> set[int]:
        """The ports this worker listens on, which no webhook may target on a local address."""
        return {*self.listener.ports, self.inbound.port}

    @property
    def logs(self) -> LogBuffer:
        return self.logging.buffer

    async def idle(self) -> None:
        """Return once no task is queued or running, no slot is held and no delivery pending."""
        while True:
            await self.dispatcher.wait_done()
            await self.slots.wait_idle()
            # A task that ended just now hands its result to a new delivery: look again.
            await self.deliveries.wait_idle()
            state = self.slots.state()
            if not (
                self.dispatcher.in_flight or state.used or state.queue or self.deliveries.pending
            ):
                return

    @property
    def parts(self) -> list[Part]:
        """The start order; they stop in reverse."""
        return [
            self.watchdog,  # pings from the first moment to the last
            self.runner,  # the thread pool
            self.slots,
            self.metrics,
            self.journal,
            self.deliveries,
            self.maintenance,
            self.api,
            self.status_line,
            self.services,  # the users' own; every task has ended before they stop
            self.webhooks,  # resumes the journal's tasks, once services are up
            self.inbound,
            self.outbound,
            self.listener,  # nothing is served before every part above is up
            # Stops first: ending the /logs followers spares the listener waiting for them.
            self.logging,
        ]


def build(
    cfg: config.Config,
    registry: Registry,
    logging: Logging,
    notifier: Notifier,
    inherited: list[socket.socket],
) -> Worker:
    """Wire the parts of one run together."""
    slots = SlotManager(cfg.worker.slots, cfg.worker.max_queue)
    slots.hold("starting")  # until every part is up
    runner = Runner(cfg.worker.default_timeout)
    services = Services(registry.services, slots, notifier, cfg)
    metrics = Metrics(
        slots,
        links=lambda: health_of([worker.outbound, worker.inbound]).get("loadBalancer", {}),
        services=services.describe,
        pending_deliveries=lambda: worker.deliveries.pending,
        dead_letters=lambda: worker.journal.dead_count,
        tasks_ended=lambda: worker.dispatcher.ended,
    )
    dispatcher = Dispatcher(slots, runner, services.values, metrics.task_ended)
    state_dir = cfg.worker.state_dir
    journal = Journal(Path(state_dir) / JOURNAL_FILE if state_dir else None, cfg.webhook.retention)
    ports = {cfg.http.port, cfg.load_balancer.websocket_port}  # until the listeners are up
    deliveries = Deliveries(
        cfg.webhook,
        journal,
        own_ports=lambda: ports | worker.own_ports,
        on_outcome=metrics.delivery,
    )
    webhooks = WebhookMode(dispatcher, deliveries, journal, registry)
    maintenance = Maintenance(slots, state_dir)
    # Bound methods: calling an object with __call__ costs a task some 600 instructions more.
    answers: dict[Mode, Answer] = {
        "sync": SyncMode(dispatcher).answer,
        "stream": StreamMode(dispatcher).answer,
        "webhook": webhooks.answer,
    }
    api = Api(
        cfg,
        registry,
        slots,
        answers,
        maintenance,
        logging.buffer,
        metrics,
        webhooks,
        sections=lambda: health_of(worker.parts),
        targets=deliveries.policy,
    )
    app = api.app()
    worker = Worker(
        registry=registry,
        logging=logging,
        slots=slots,
        runner=runner,
        dispatcher=dispatcher,
        journal=journal,
        deliveries=deliveries,
        webhooks=webhooks,
        maintenance=maintenance,
        api=api,
        app=app,
        status_line=StatusLine(notifier, slots),
        services=services,
        metrics=metrics,
        watchdog=Watchdog(notifier),
        inbound=InboundServer(slots, cfg, services.describe),
        outbound=OutboundClient(slots, registry, cfg, services.describe),
        listener=HttpServer(app, cfg, inherited, api.entry),
    )
    return worker


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
        self._reloads: set[asyncio.Task[None]] = set()
        self._grace_over = False
        self._kept = 0  # journaled tasks left queued for the next start

    async def serve(self) -> int:
        # Start.
        cfg = self.config
        self.logging.configure(cfg.logging.level, cfg.logging.format, cfg.secrets(), self.environ)
        raise_open_file_limit()  # before the listener sizes http.max_connections to fit it
        try:
            registry = functions.load(cfg.worker.functions)
        except functions.LoadError as exc:
            _log.error("cannot start", reason=str(exc))
            return 1
        worker = build(cfg, registry, self.logging, self.notifier, self._inherited_sockets())
        try:
            await start_all(worker.parts)
        except StartFailed as exc:
            _log.error("cannot start", part=exc.part, reason=str(exc))
            return 1
        worker.slots.hold("starting", False)
        self._install_signals(worker)
        self._log_startup(worker)
        _freeze_heap()
        self.notifier.ready(worker.slots.state())

        # Serve until SIGTERM or SIGINT; SIGHUP reloads meanwhile (_reload).
        await self._stop.wait()

        # Drain, then stop.
        deadline = asyncio.get_running_loop().time() + self.config.worker.drain_timeout
        summary = await self._drain(worker, deadline)
        for reload in self._reloads:
            reload.cancel()
        await stop_all(worker.parts, deadline)
        summary["undelivered"] = worker.deliveries.abandoned
        self.notifier.close()
        # Last, so that it is the final line whatever the parts logged while closing.
        _log.info("stopped", **summary)
        return 0

    async def _reload(self, worker: Worker) -> None:
        self.notifier.reloading()
        old = self.config
        try:
            new = config.load(self.path, self.environ, self.flags)
            apply_all(worker.parts, new)
        except (ConfigError, ReloadRefused) as exc:
            _log.error("reload refused, keeping the running config", by="SIGHUP", reason=str(exc))
            self.notifier.ready(worker.slots.state())
            return
        self.config = new
        if self.path is None:
            _log.info("reload: no config file, re-reading the environment only")
        _log.info(
            "configuration reloaded",
            by="SIGHUP",
            changed=", ".join(config.changed(old, new)) or "nothing",
        )
        restart = config.needs_restart(old, new)
        if restart:
            _log.warning("reload: these settings need a restart", settings=", ".join(restart))
        self.notifier.ready(worker.slots.state())

    async def _drain(self, worker: Worker, deadline: float) -> dict[str, int]:
        """Finish what was accepted, up to the deadline; returns what became of it. During the
        first `drain_grace` seconds new tasks are still taken, though the status says draining."""
        dispatcher = worker.dispatcher
        loop = asyncio.get_running_loop()
        grace = min(self.config.worker.drain_grace, max(deadline - loop.time(), 0.0))
        worker.slots.set_grace(grace > 0)
        worker.slots.hold("draining")
        before = dispatcher.counts.copy()
        self.notifier.stopping(f"draining: {dispatcher.in_flight} tasks in flight")
        _log.info(
            "draining",
            in_flight=dispatcher.in_flight,
            queued=worker.slots.state().queue,
            pending_deliveries=worker.deliveries.pending,
            timeout=self.config.worker.drain_timeout,
            grace=grace,
        )
        if not await self._wait_drained(worker, loop.time() + grace, deadline):
            self._end_grace(worker)
            cancelled = dispatcher.cancel_all()
            _log.warning("drain deadline passed, cancelling what is left", tasks=cancelled)
            # Let the cancelled tasks answer their clients (503) before the listener closes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ANSWER_CANCELLED):
                    await dispatcher.wait_done()
        after = dispatcher.counts - before
        return {
            "completed": sum(after[o] for o in Outcome if o is not Outcome.CANCELLED),
            "cancelled": after[Outcome.CANCELLED] - self._kept,
            "kept": self._kept,
        }

    def _end_grace(self, worker: Worker) -> None:
        """No more new tasks; journaled ones still waiting stay in the journal for the next
        start instead of holding up the stop."""
        if not self._grace_over:
            self._grace_over = True
            worker.slots.set_grace(False)
            self._kept = worker.webhooks.keep_queued()

    async def _wait_drained(self, worker: Worker, grace_ends: float, deadline: float) -> bool:
        """Take tasks until `grace_ends`, then wait for tasks and deliveries to finish, telling
        systemd to extend its stop timeout meanwhile; False when the deadline passed or a second
        signal said to stop at once."""
        loop = asyncio.get_running_loop()
        now_task: asyncio.Future[Any] = asyncio.ensure_future(self._now.wait())
        idle: asyncio.Future[Any] | None = None
        try:
            while True:
                now = loop.time()
                remaining = deadline - now
                if remaining <= 0 or self._now.is_set():
                    return False
                self.notifier.extend_timeout(min(remaining, EXTEND_EVERY) + EXTEND_EVERY)
                if now < grace_ends:
                    await asyncio.wait({now_task}, timeout=min(grace_ends - now, EXTEND_EVERY))
                    continue
                if idle is None:
                    self._end_grace(worker)
                    idle = asyncio.ensure_future(worker.idle())
                done, _ = await asyncio.wait(
                    {idle, now_task},
                    timeout=min(remaining, EXTEND_EVERY),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if idle in done:
                    return True
        finally:
            if idle is not None:
                idle.cancel()
            now_task.cancel()

    def _install_signals(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._start_reload(worker))

    def _start_reload(self, worker: Worker) -> None:
        reload = asyncio.ensure_future(self._reload(worker))
        self._reloads.add(reload)
        reload.add_done_callback(self._reloads.discard)

    def _on_sigterm(self) -> None:
        if self._stop.is_set():
            _log.warning("second SIGTERM: stopping at once")
            self._now.set()
        self._stop.set()

    def _on_sigint(self) -> None:
        _log.warning("SIGINT: stopping at once")
        self._now.set()
        self._stop.set()

    def _inherited_sockets(self) -> list[socket.socket]:
        """The listening sockets systemd passed (socket activation), if they are ours."""
        if self.environ.get("LISTEN_PID") != str(os.getpid()):
            return []
        count = int(self.environ.get("LISTEN_FDS", "0") or 0)
        return [
            socket.socket(fileno=fd)
            for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
        ]

    def _log_startup(self, worker: Worker) -> None:
        cfg = self.config
        _log.info(
            "base-worker started",
            version=__version__,
            loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            json=jsoncodec.ENGINE,
            listening=", ".join(worker.listener.addresses),
            functions=", ".join(worker.registry.functions),
            slots=cfg.worker.slots,
            max_queue=cfg.worker.max_queue,
            group=cfg.worker.group,
            contract=cfg.worker.contract,
            status=worker.slots.status,
        )
        for name in cfg.weak_keys():
            _log.warning(
                f"{name} is shorter than {config.STRONG_KEY_LENGTH} characters: a weak key",
                generate="python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
            )
        if not cfg.worker.state_dir:
            _log.warning(
                "webhook tasks are kept in memory only: a crash or kill loses those not yet "
                "delivered; set worker.state_dir (systemd: StateDirectory=) to journal them"
            )
        if cfg.uses_dev_keys:
            _log.warning(
                "USING DEV-ONLY KEYS FROM config.example.toml: anyone who read the example can "
                "call this worker; set [auth] auth_key and lb_auth_key before exposing it"
            )
        if cfg.webhook.headers and not cfg.webhook.header_targets:
            _log.warning(
                "webhook.headers are sent to every webhook target a task names; set "
                "webhook.header_targets to the URL prefixes that may receive them"
            )


def _freeze_heap() -> None:
    # Everything built so far lives as long as the daemon: keep it out of the collector's
    # full passes, which otherwise walk it all every few hundred requests (p99 spikes).
    gc.collect()
    gc.freeze()
    # Each request allocates a few hundred objects; collecting the youngest generation every
    # 700 allocations cost more than the tasks themselves with thousands queued.
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


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
