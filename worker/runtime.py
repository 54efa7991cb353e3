"""The daemon's shared state: configuration, functions, slots and tasks, held in one place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from worker.config import Config
from worker.errors import Conflict
from worker.functions import Registry
from worker.logs import LogBuffer
from worker.runner import Runner
from worker.slots import SlotManager
from worker.tasks import Dispatcher
from worker.webhooks import Deliveries

_log = structlog.get_logger("worker.runtime")
MAINTENANCE_FILE = "maintenance"


class Runtime:
    """What the handlers and the lifecycle share; `config` is replaced whole on reload."""

    def __init__(self, config: Config, registry: Registry, logs: LogBuffer) -> None:
        self.config = config
        self.registry = registry
        self.logs = logs
        self.slots = SlotManager(config.worker.slots, config.worker.max_queue)
        self.runner = Runner(config.worker.default_timeout)
        self.dispatcher = Dispatcher(self.slots, self.runner)
        self.deliveries = Deliveries(lambda: self.config.webhook)
        # Extra sections of the detailed /health, filled by the parts that own them.
        self.health_sections: dict[str, Callable[[], Any]] = {}
        # Called as hook(old, new) after a reload was applied (the load balancer link).
        self.reload_hooks: list[Callable[[Config, Config], None]] = []
        self.health_sections["webhooks"] = self.deliveries.describe

    def set_maintenance(self, on: bool) -> None:
        """POST /off and /on; refused while draining for shutdown."""
        if self.slots.status == "draining":
            if not on:
                raise Conflict("Worker is draining for shutdown; it cannot be put back in service")
            return
        self.slots.set_status("maintenance" if on else "ready")
        self._remember_maintenance(on)

    def _maintenance_file(self) -> Path | None:
        state_dir = self.config.worker.state_dir
        return Path(state_dir) / MAINTENANCE_FILE if state_dir else None

    def _remember_maintenance(self, on: bool) -> None:
        marker = self._maintenance_file()
        if marker is None:
            return
        try:
            if on:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("maintenance mode set by POST /off\n")
            else:
                marker.unlink(missing_ok=True)
        except OSError as exc:
            _log.error("cannot remember maintenance mode", path=str(marker), reason=str(exc))

    def restore_maintenance(self) -> None:
        """Start in maintenance when the previous run was left in it (`worker.state_dir`)."""
        marker = self._maintenance_file()
        if marker is not None and marker.exists():
            self.slots.set_status("maintenance")
            _log.warning("starting in maintenance mode (POST /on to serve)", marker=str(marker))

    async def wait_drained(self) -> None:
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

    def apply(self, config: Config) -> None:
        """Take the settings of a reloaded config that can change while tasks run."""
        old, self.config = self.config, config
        self.slots.resize(config.worker.slots)
        self.slots.set_max_queue(config.worker.max_queue)
        self.runner.default_timeout = config.worker.default_timeout
        for hook in list(self.reload_hooks):
            hook(old, config)
