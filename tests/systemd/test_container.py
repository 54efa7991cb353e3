"""The harness itself: the cached root boots under systemd-nspawn and is driven through nsenter."""

from __future__ import annotations

import pytest

from .nspawn import Container

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]


def test_container_boots_systemd(container: Container) -> None:
    assert container.run("systemctl", "is-system-running").stdout.strip() in ("running", "degraded")
    assert container.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    version = container.run("python3", "-c", "import sys; print(sys.version_info[:2])").stdout
    assert version.strip() == "(3, 11)"
