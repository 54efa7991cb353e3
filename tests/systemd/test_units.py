"""Static checks of the shipped units: `systemd-analyze verify` and `security --offline=true`.

`verify` also checks that every Exec*= binary exists and is executable. /opt/base-worker does not
exist on a development machine, so the units are verified against a temporary root holding: a copy
of this host's system units (for targets such as multi-user.target), a copy of /bin/kill, an
executable stub at /opt/base-worker/bin/base-worker, and our units in /etc/systemd/system. So what
is checked is the syntax, every key and value, dependencies, and the command paths as written;
not that the daemon really runs (that is tests/systemd/test_e2e.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
SERVICES = ("base-worker.service", "base-worker@.service")
# What `verify` is asked about: the template is checked through an instance of it.
VERIFIED = ("base-worker.service", "base-worker@example.service", "base-worker.socket")
MAX_EXPOSURE = 1.5

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def _system_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            return candidate
    pytest.skip("no system unit directory with multi-user.target on this host")


def _verify_root(tmp_path: Path, units: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(_system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in units.iterdir():
        if unit.suffix in (".service", ".socket"):
            shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    (root / "bin").mkdir()
    shutil.copy(shutil.which("kill") or "/bin/kill", root / "bin/kill")
    stub = root / "opt/base-worker/bin/base-worker"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("unit", VERIFIED)
def test_verify_is_clean(unit: str, tmp_path: Path) -> None:
    root = _verify_root(tmp_path, UNIT_DIR)
    proc = _verify(root, unit)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == "", "systemd-analyze verify printed warnings"


def test_verify_catches_mistakes(tmp_path: Path) -> None:
    """Verifying in the temporary root is not vacuous: a bad key and a bad path are reported."""
    units = tmp_path / "units"
    units.mkdir()
    text = (UNIT_DIR / "base-worker.service").read_text()
    text = text.replace("KillMode=mixed", "KillMode=mixed\nKilMode=mixed")
    text = text.replace("ExecReload=/bin/kill", "ExecReload=/bin/kil")
    (units / "base-worker.service").write_text(text)
    proc = _verify(_verify_root(tmp_path, units), "base-worker.service")
    output = proc.stdout + proc.stderr
    assert "KilMode" in output
    assert "/bin/kil" in output


def _exposure(unit: Path) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, f"no exposure level in:\n{proc.stdout}\n{proc.stderr}"
    return float(match.group(1))


@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure(unit: str) -> None:
    exposure = _exposure(UNIT_DIR / unit)
    assert exposure <= MAX_EXPOSURE, f"{unit}: exposure {exposure} > {MAX_EXPOSURE}"


def test_template_matches_service() -> None:
    """The template differs from the single unit only in config path, state dir and names."""

    def settings(unit: str) -> list[str]:
        lines = (UNIT_DIR / unit).read_text().splitlines()
        return [line for line in lines if not line.startswith(("#", "Description="))]

    single, template = settings("base-worker.service"), settings("base-worker@.service")
    for a, b in zip(single, template, strict=True):
        assert b == a.replace("/etc/base-worker/config.toml", "/etc/base-worker/%i.toml").replace(
            "StateDirectory=base-worker", "StateDirectory=base-worker/%i"
        )


@pytest.mark.parametrize("unit", SERVICES)
def test_open_file_limit_has_room_for_the_connections(unit: str) -> None:
    """Each client connection is a descriptor: the usual 1,024 is below http.max_connections."""
    lines = (UNIT_DIR / unit).read_text().splitlines()
    service = lines[lines.index("[Service]") + 1 : lines.index("[Install]")]
    assert "LimitNOFILE=65536" in service
