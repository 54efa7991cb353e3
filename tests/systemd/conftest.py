"""Fixtures for the systemd tests: the cached container root and a booted container."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .nspawn import Container, booted, ensure_root, unavailable_reason


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "systemd: runs under a real systemd in a systemd-nspawn container (slow, root)"
    )


@pytest.fixture(scope="session")
def nspawn_root() -> Path:
    """The cached Debian bookworm root; skips only where no container can be started."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no systemd-nspawn container here: {reason}")
    return ensure_root()


@pytest.fixture(scope="module")
def container(nspawn_root: Path) -> Iterator[Container]:
    """A plain booted container on a throw-away copy of the cached root."""
    with booted(nspawn_root) as box:
        yield box
