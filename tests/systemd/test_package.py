"""The Debian package under a real systemd: build, install, reload, upgrade, purge.

`make deb` runs twice, once per module, in parallel: in a fresh clone of this repository, and in a
second clone whose version is bumped (a "newer build"). A clean Debian 12 container (cached root,
throw-away copy) with its own network namespace then installs, upgrades and purges the package; its
fixed port 3000 cannot clash with anything on the host. HTTP requests run inside the container,
with its python3, on its loopback.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from worker import __version__

from .nspawn import Container, booted, debian_mirror, wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(900)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
UNIT = "base-worker.service"
NEWER = f"{__version__}.post1"
CONFIG = "/etc/base-worker/config.toml"
KEYS = "/etc/base-worker/keys.toml"
FUNCTIONS_DIR = "/etc/base-worker/functions"
APT = ("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "--yes", "--quiet")
# An admin's edited config.toml against a changed packaged one: keep the admin's, unasked.
KEEP_CONFIG = ("-o", "Dpkg::Options::=--force-confold")

# One request from inside the container: argv = method, path, key, body; prints [status, body].
CLIENT = """\
import json, sys, urllib.error, urllib.request
method, path, key, body = sys.argv[1:]
request = urllib.request.Request(
    "http://127.0.0.1:3000" + path, data=body.encode() or None, method=method,
    headers={"Content-Type": "application/json", **({"Authorization": key} if key else {})})
try:
    with urllib.request.urlopen(request, timeout=60) as response:
        status, data = response.status, response.read()
except urllib.error.HTTPError as error:
    status, data = error.code, error.read()
print(json.dumps([status, json.loads(data or b"null")]))
"""


@dataclass
class Packages:
    old: Path
    new: Path
    build_log: str
    clone: Path


def make_deb(tree: Path) -> tuple[Path, str]:
    proc = subprocess.run(
        ["make", "deb"], cwd=tree, capture_output=True, text=True, timeout=600, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"make deb failed in {tree}:\n{output[-5000:]}"
    (deb,) = (tree / "dist").glob("base-worker_*.deb")
    return deb, output


def bump_version(tree: Path) -> None:
    """The same tree as a newer release: version, changelog entry, and a changed conffile."""
    init = tree / "worker/__init__.py"
    init.write_text(init.read_text().replace(f'"{__version__}"', f'"{NEWER}"'))
    changelog = tree / "packaging/debian/changelog"
    old = changelog.read_text()
    maintainer = next(line for line in old.splitlines() if line.startswith(" -- ")).split("  ")[0]
    now = email.utils.format_datetime(datetime.now(UTC).replace(microsecond=0))
    entry = f"base-worker ({NEWER}-1) bookworm; urgency=medium\n\n  * Test build.\n\n"
    entry += f"{maintainer}  {now}\n\n"
    changelog.write_text(entry + old)
    config = tree / "packaging/config.toml"
    config.write_text(config.read_text() + "# changed in the newer build\n")


def build_unavailable_reason() -> str | None:
    """Why `make deb` cannot run here, or None: it installs its tools with apt, as root."""
    tools = ("dpkg-buildpackage", "dh", "lintian")
    if all(shutil.which(tool) for tool in tools):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"make deb needs {', '.join(tools)}, and only root on Debian can install them"
    return None


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    """Both .debs, built once per module from fresh clones (committed work only)."""
    reason = build_unavailable_reason()
    if reason:
        pytest.skip(reason)
    clones = tmp_path_factory.mktemp("clones")
    for name in ("old", "new"):
        cmd = ["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clones / name)]
        subprocess.run(cmd, check=True, timeout=120)
    bump_version(clones / "new")
    with ThreadPoolExecutor(max_workers=2) as pool:
        old, new = pool.map(make_deb, (clones / "old", clones / "new"))
    return Packages(old[0], new[0], old[1], clones / "old")


@dataclass
class Server:
    box: Container
    packages: Packages

    def sh(self, script: str, check: bool = True) -> str:
        return self.box.run("sh", "-c", script, check=check).stdout

    def request(self, method: str, path: str, body: Any = None, key: str = "") -> tuple[int, Any]:
        data = json.dumps(body) if body is not None else ""
        out = self.box.run("python3", "-c", CLIENT, method, path, key, data).stdout
        status, answer = json.loads(out)
        return int(status), answer

    def keys(self) -> dict[str, str]:
        return tomllib.loads(self.box.run("cat", KEYS).stdout)

    def health(self) -> dict[str, Any]:
        status, body = self.request("GET", "/health", key=self.keys()["auth_key"])
        assert status == 200, body
        return dict(body)

    def task(self, function: str, params: dict[str, Any]) -> tuple[int, Any]:
        body = {"function": function, "input": params, "contract": 1}
        return self.request("POST", "/task", body, key=self.keys()["auth_key"])

    def show(self, *props: str) -> dict[str, str]:
        return self.box.show(UNIT, *props)

    def journal(self) -> str:
        cmd = ("journalctl", "--no-pager", "-o", "cat", "-n", "80", "-u", UNIT)
        return self.box.run(*cmd, check=False).stdout

    def installed_version(self) -> str:
        cmd = ("dpkg-query", "-W", "-f=${Version}", "base-worker")
        return self.box.run(*cmd, check=False).stdout


@pytest.fixture(scope="module")
def server(nspawn_root: Path, packages: Packages) -> Iterator[Server]:
    binds = [(packages.old.parent, "/mnt/old"), (packages.new.parent, "/mnt/new")]
    with booted(nspawn_root, binds=binds, private_network=True) as box:
        yield Server(box, packages)


def test_make_deb_from_a_clean_clone_is_lintian_clean(packages: Packages) -> None:
    assert packages.old.name.startswith(f"base-worker_{__version__}-")
    findings = re.findall(r"^[EW]: .*$", packages.build_log, re.MULTILINE)
    assert findings == [], "\n".join(findings)
    assert f"built dist/{packages.old.name}" in packages.build_log
    # Nothing in the package names the directory it was built in.
    tree = packages.clone / "unpacked"
    subprocess.run(["dpkg-deb", "-x", str(packages.old), str(tree)], check=True, timeout=120)
    grep = ["grep", "-rl", str(packages.clone / "build"), str(tree)]
    found = subprocess.run(grep, capture_output=True, text=True, timeout=120, check=False)
    assert found.stdout == ""
    # The venv runs on Debian's python3, whatever interpreter the build machine put first on PATH.
    venv = tree / "opt/base-worker"
    assert (venv / "bin/python3").readlink() == Path("/usr/bin/python3")
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines())
    assert cfg["home"] == "/usr/bin"
    assert cfg["command"] == "/usr/bin/python3 -m venv /opt/base-worker"


def test_every_dependency_is_a_debian_package(server: Server) -> None:
    fields = ("dpkg-deb", "--field", f"/mnt/old/{server.packages.old.name}", "Depends")
    depends = server.box.run(*fields).stdout
    mirror = debian_mirror()
    assert mirror
    for group in depends.split(","):
        names = [re.sub(r"\s*\(.*\)", "", alt).strip() for alt in group.split("|")]
        found = [server.box.run("apt-cache", "madison", name).stdout for name in names]
        assert any(mirror in out for out in found), f"{group.strip()}: not from {mirror}"
    # Installing needs nothing beyond what a Debian 12 system with python3 already has.
    plan = server.box.run(*APT, "install", "--simulate", f"/mnt/old/{server.packages.old.name}")
    installs = re.findall(r"^Inst (\S+)", plan.stdout, re.MULTILINE)
    assert installs == ["base-worker"], plan.stdout


def test_install_starts_the_service_with_generated_keys(server: Server) -> None:
    server.box.run(*APT, "install", f"/mnt/old/{server.packages.old.name}", timeout=300)
    state = server.show("ActiveState", "SubState", "StatusText", "UnitFileState")
    assert state["ActiveState"] == "active", server.journal()
    assert state["StatusText"].strip(), state
    assert state["UnitFileState"] == "enabled"
    assert server.sh(f"stat -c '%U:%G %a' {KEYS}").split() == ["root:base-worker", "640"]
    keys = server.keys()
    assert set(keys) == {"auth_key", "lb_auth_key"} and all(len(v) >= 32 for v in keys.values())
    assert server.task("hello", {"name": "Andera"}) == (
        200,
        {"success": True, "result": {"message": "Hello Andera!"}},
    )
    assert server.request("POST", "/task", {"function": "hello", "contract": 1})[0] == 401
    assert server.health()["version"] == __version__
    assert server.box.run("base-worker", "--version").stdout.strip() == f"base-worker {__version__}"
    for path in (
        "/usr/share/man/man1/base-worker.1.gz",
        "/usr/share/doc/base-worker/copyright",
        "/usr/share/doc/base-worker/changelog.Debian.gz",
        "/usr/lib/sysusers.d/base-worker.conf",
        "/lib/systemd/system/base-worker.socket",
        "/lib/systemd/system/base-worker@.service",
    ):
        server.box.run("test", "-f", path)
    assert server.show("User")["User"] == "base-worker"


def test_reload_keeps_the_pid(server: Server) -> None:
    before = server.show("MainPID")["MainPID"]
    server.box.run("systemctl", "reload", UNIT)
    assert server.show("ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": before}
    assert server.task("hello", {"name": "again"})[0] == 200


def test_upgrade_drains_tasks_and_keeps_keys_and_config(server: Server) -> None:
    functions = (HERE / "e2e_functions.py").read_text()
    server.box.write(f"{FUNCTIONS_DIR}/e2e_functions.py", functions)
    edited = server.box.run("cat", CONFIG).stdout.replace("slots = 10", "slots = 3")
    edited += "# edited by the admin\n"
    server.box.write(CONFIG, edited)
    server.box.run("systemctl", "restart", UNIT)  # new function modules load at start
    keys_before = server.sh(f"stat -c '%U:%G %a' {KEYS}; sha256sum {KEYS}")
    pid = server.show("MainPID")["MainPID"]

    # Three tasks running, three queued behind them, when the upgrade begins.
    with ThreadPoolExecutor(max_workers=6) as pool:
        calls = [pool.submit(server.task, "sleepy", {"seconds": 2}) for _ in range(6)]
        wait_for(
            lambda: server.health()["slots"] == {"used": 3, "available": 0, "limit": 3, "queue": 3},
            30,
            "3 busy slots and 3 queued tasks",
        )
        started = time.monotonic()
        upgrade = server.box.run(
            *APT,
            *KEEP_CONFIG,
            "install",
            f"/mnt/new/{server.packages.new.name}",
            timeout=300,
        )
        answers = [call.result(timeout=60) for call in calls]
    assert answers == [(200, {"success": True, "result": {"slept": 2}})] * 6, upgrade.stdout
    assert time.monotonic() - started >= 2  # the stop waited for the drain

    assert server.installed_version() == f"{NEWER}-1"
    state = server.show("ActiveState", "MainPID")
    assert state["ActiveState"] == "active" and state["MainPID"] not in ("0", pid)
    assert server.health()["version"] == NEWER
    assert server.sh(f"stat -c '%U:%G %a' {KEYS}; sha256sum {KEYS}") == keys_before
    assert server.box.run("cat", CONFIG).stdout == edited
    assert "changed in the newer build" in server.box.run("cat", f"{CONFIG}.dpkg-dist").stdout


def test_roll_back_to_the_older_build(server: Server) -> None:
    keys = server.box.run("cat", KEYS).stdout
    config = server.box.run("cat", CONFIG).stdout
    old = f"/mnt/old/{server.packages.old.name}"
    server.box.run(*APT, *KEEP_CONFIG, "--allow-downgrades", "install", old, timeout=300)
    assert server.installed_version() == server.packages.old.name.split("_")[1]
    assert server.show("ActiveState")["ActiveState"] == "active", server.journal()
    assert server.health()["version"] == __version__
    assert server.box.run("cat", KEYS).stdout == keys
    assert server.box.run("cat", CONFIG).stdout == config


def test_remove_stops_the_service_and_keeps_config_and_keys(server: Server) -> None:
    keys = server.box.run("cat", KEYS).stdout
    server.box.run(*APT, "remove", "base-worker", timeout=300)
    assert server.show("ActiveState")["ActiveState"] == "inactive"
    assert server.box.run("cat", KEYS).stdout == keys
    server.box.run("test", "-f", CONFIG)
    server.box.run("test", "!", "-e", "/opt/base-worker/bin/base-worker")


def test_purge_leaves_nothing(server: Server) -> None:
    # dpkg still lists what a removed package keeps (its conffiles); purge takes the rest too.
    new = f"/mnt/new/{server.packages.new.name}"
    server.box.run(*APT, *KEEP_CONFIG, "install", new, timeout=300)
    owned = server.box.run("dpkg-query", "-L", "base-worker").stdout.split("\n")
    server.box.run(*APT, "purge", "base-worker", timeout=300)
    assert server.box.run("dpkg-query", "-L", "base-worker", check=False).returncode != 0
    for path in ("/etc/base-worker", "/var/lib/base-worker", "/opt/base-worker"):
        assert server.box.run("test", "-e", path, check=False).returncode != 0, path
    # Every path the package had is gone, but directories other packages share.
    script = """for p in "$@"; do
        [ -e "$p" ] || continue
        [ -d "$p" ] && dpkg-query -S "$p" >/dev/null 2>&1 || echo "$p"
    done"""
    paths = [p for p in owned if p not in ("", "/.")]
    assert server.box.run("sh", "-c", script, "sh", *paths).stdout == ""
    state = server.show("LoadState", "ActiveState")
    assert state == {"LoadState": "not-found", "ActiveState": "inactive"}
