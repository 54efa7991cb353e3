"""Maintenance mode (POST /off and /on), remembered across restarts with `worker.state_dir`."""

from __future__ import annotations

from pathlib import Path

import structlog

from worker.errors import Conflict
from worker.parts import Part
from worker.slots import SlotManager

_log = structlog.get_logger("worker.maintenance")
MAINTENANCE_FILE = "maintenance"


class Maintenance(Part):
    """Switches the worker between ready and maintenance; refuses while draining."""

    name = "maintenance mode"

    def __init__(self, slots: SlotManager, state_dir: str) -> None:
        self._slots = slots
        self._marker = Path(state_dir) / MAINTENANCE_FILE if state_dir else None

    async def start(self) -> None:
        """Start in maintenance when the previous run was left in it."""
        if self._marker is not None and self._marker.exists():
            self._slots.hold("maintenance")
            _log.warning(
                "starting in maintenance mode (POST /on to serve)", marker=str(self._marker)
            )

    def set(self, on: bool) -> None:
        """POST /off (`on` True) and /on; both refused while draining for shutdown."""
        if self._slots.status == "draining":
            raise Conflict("Worker is draining for shutdown; maintenance mode cannot change")
        self._slots.hold("maintenance", on)
        self._remember(on)

    def _remember(self, on: bool) -> None:
        if self._marker is None:
            return
        try:
            if on:
                self._marker.parent.mkdir(parents=True, exist_ok=True)
                self._marker.write_text("maintenance mode set by POST /off\n")
            else:
                self._marker.unlink(missing_ok=True)
        except OSError as exc:
            _log.error("cannot remember maintenance mode", path=str(self._marker), reason=str(exc))
