"""Maintenance mode (worker/maintenance.py): POST /off and /on, refused while draining, and
remembered across restarts in `worker.state_dir`."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from worker.errors import Conflict
from worker.maintenance import MAINTENANCE_FILE, Maintenance
from worker.slots import SlotManager


def slots() -> SlotManager:
    return SlotManager(limit=2, max_queue=10)


def test_set_switches_between_maintenance_and_ready() -> None:
    manager = slots()
    maintenance = Maintenance(manager, "")
    maintenance.set(True)
    assert manager.status == "maintenance"
    maintenance.set(True)  # idempotent
    assert manager.status == "maintenance"
    maintenance.set(False)
    assert manager.status == "ready"
    maintenance.set(False)
    assert manager.status == "ready"


@pytest.mark.parametrize("on", [True, False], ids=["off (maintenance)", "on (ready)"])
def test_both_directions_are_refused_with_409_while_draining(tmp_path: Path, on: bool) -> None:
    manager = slots()
    marker = tmp_path / MAINTENANCE_FILE
    if not on:
        marker.write_text("left by a previous POST /off\n")
    maintenance = Maintenance(manager, str(tmp_path))
    manager.hold("draining")
    with pytest.raises(Conflict) as refused:
        maintenance.set(on)
    assert refused.value.status == 409
    assert "draining" in refused.value.message
    assert manager.status == "draining"
    assert marker.exists() is (not on)  # the marker is left as it was


def test_the_marker_file_follows_the_mode(tmp_path: Path) -> None:
    state = tmp_path / "not" / "yet" / "there"
    maintenance = Maintenance(slots(), str(state))
    maintenance.set(True)
    assert (state / MAINTENANCE_FILE).is_file()
    maintenance.set(False)
    assert not (state / MAINTENANCE_FILE).exists()
    maintenance.set(False)  # nothing to remove: still fine
    assert not (state / MAINTENANCE_FILE).exists()


async def test_start_restores_maintenance_left_by_the_previous_run(tmp_path: Path) -> None:
    Maintenance(slots(), str(tmp_path)).set(True)
    restarted = slots()
    with capture_logs() as logged:
        await Maintenance(restarted, str(tmp_path)).start()
    assert restarted.status == "maintenance"
    assert [(e["event"], e["log_level"]) for e in logged] == [
        ("starting in maintenance mode (POST /on to serve)", "warning")
    ]
    assert logged[0]["marker"] == str(tmp_path / MAINTENANCE_FILE)


async def test_start_without_a_marker_stays_ready(tmp_path: Path) -> None:
    first = Maintenance(slots(), str(tmp_path))
    first.set(True)
    first.set(False)
    restarted = slots()
    await Maintenance(restarted, str(tmp_path)).start()
    assert restarted.status == "ready"
    unremembered = slots()
    await Maintenance(unremembered, "").start()
    assert unremembered.status == "ready"


def test_an_unwritable_state_dir_logs_an_error_and_carries_on(tmp_path: Path) -> None:
    # A file where the directory should be: no mkdir can succeed there, not even as root.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    manager = slots()
    maintenance = Maintenance(manager, str(blocker / "state"))
    with capture_logs() as logged:
        maintenance.set(True)
    assert manager.status == "maintenance"
    errors = [e for e in logged if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["cannot remember maintenance mode"]
    assert errors[0]["path"] == str(blocker / "state" / MAINTENANCE_FILE)
    assert errors[0]["reason"]
    maintenance.set(False)  # POST /on still works
    assert manager.status == "ready"
