"""The users' services (`@service`): started in declaration order before the worker serves,
stopped in reverse after it drained, restarted with capped back-off when they ask for it.

Every service is required: while one is not up the worker is `degraded` (/ready 503, and the
Andera balancer, which reads `services`, routes nothing to it). A service whose start hangs
counts as down after `worker.service_start_timeout`; systemd is asked to extend its start
timeout meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from worker.config import Config
from worker.context import ServiceContext
from worker.functions import ServiceSpec
from worker.notify import Notifier
from worker.parts import Part
from worker.slots import SlotManager

_log = structlog.get_logger("worker.services")

State = Literal["up", "down", "restarting"]
BACKOFF_FIRST = 1.0  # seconds before the first restart; doubles each time
BACKOFF_MAX = 60.0
STOP_TIMEOUT = 10.0  # seconds one service's teardown may take when the drain left no time


@dataclass
class Running:
    """One service as it is now."""

    spec: ServiceSpec
    state: State = "down"
    status: Any = None  # what it yielded, or why it is down
    generator: AsyncGenerator[Any, None] | None = None
    failures: int = 0

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.name, "state": self.state, "status": self.status}


class Services(Part):
    """Owns every service's life; `values` is what `ctx.services` shows functions."""

    name = "services"

    def __init__(
        self,
        specs: Mapping[str, ServiceSpec],
        slots: SlotManager,
        notifier: Notifier,
        config: Config,
    ) -> None:
        self._services = [Running(spec) for spec in specs.values()]
        self._slots = slots
        self._notifier = notifier
        self._config = config
        self._restarts: set[asyncio.Task[None]] = set()
        self.values: dict[str, Any] = {}

    def describe(self) -> list[dict[str, Any]]:
        """`[{"name", "state", "status"}]`, as /health and the load balancer links show it."""
        return [service.describe() for service in self._services]

    def health(self) -> dict[str, Any]:
        return {"services": self.describe()}

    def apply(self, new: Config) -> None:
        self._config = new

    async def start(self) -> None:
        for service in self._services:
            if not await self._start_one(service):
                self._schedule_restart(service)
        self._update_status()

    async def stop(self, deadline: float) -> None:
        for restart in list(self._restarts):
            restart.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)
        loop = asyncio.get_running_loop()
        for service in reversed(self._services):
            if service.state == "up":
                await self._stop_one(service, max(deadline - loop.time(), STOP_TIMEOUT))

    async def _start_one(self, service: Running) -> bool:
        name = service.spec.name
        timeout = self._config.worker.service_start_timeout
        self._notifier.extend_timeout(timeout + 5.0)
        log = _log.bind(service=name)
        generator = service.spec.factory(ServiceContext(name, log))
        try:
            async with asyncio.timeout(timeout):
                value = await anext(generator)
        except TimeoutError:
            reason = f"did not start within {timeout:g}s (worker.service_start_timeout)"
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            service.state, service.status, service.generator = "up", value, generator
            service.failures = 0
            self.values[name] = value
            log.info("service started", status=value)
            return True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STOP_TIMEOUT):
                await generator.aclose()
        service.state, service.status = "down", reason
        service.failures += 1
        log.error("service failed to start", reason=reason, failures=service.failures)
        return False

    async def _stop_one(self, service: Running, seconds: float) -> None:
        generator, service.generator = service.generator, None
        service.state, service.status = "down", "stopped"
        self.values.pop(service.spec.name, None)
        if generator is None:
            return
        try:
            async with asyncio.timeout(seconds):
                await anext(generator)
        except StopAsyncIteration:
            _log.info("service stopped", service=service.spec.name)
            return
        except Exception as exc:
            _log.error("service failed to stop", service=service.spec.name, reason=repr(exc))
        else:
            _log.error("service yielded twice; closing it", service=service.spec.name)
        with contextlib.suppress(Exception):
            await generator.aclose()

    def _schedule_restart(self, service: Running) -> None:
        if not service.spec.restart_on_failure:
            return
        service.state = "restarting"
        restart = asyncio.create_task(self._restart(service), name=f"restart {service.spec.name}")
        self._restarts.add(restart)
        restart.add_done_callback(self._restarts.discard)

    async def _restart(self, service: Running) -> None:
        while True:
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (service.failures - 1))
            _log.info("service restarting", service=service.spec.name, retry_in=delay)
            await asyncio.sleep(delay)
            if await self._start_one(service):
                self._update_status()
                return
            service.state = "restarting"

    def _update_status(self) -> None:
        self._slots.hold("degraded", any(s.state != "up" for s in self._services))
