"""base-worker under a real systemd: the shipped units, installed as docs/systemd.md says.

A Debian bookworm container (systemd-nspawn, cached root, throw-away copy per run) gets a venv in
/opt/base-worker built from wheels of this checkout, the units from systemd/, the sysusers entry, a
config in /etc/base-worker readable only by root and the service's group, and a small module of
test functions. The container shares the host's network namespace, so the test talks HTTP to
127.0.0.1 from the host. Set BASE_WORKER_E2E_SOURCE to install another source tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .nspawn import Container, booted, wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
UNIT = "base-worker.service"
AUTH_KEY = "e2e-" + uuid.uuid4().hex
FUNCTIONS_FILE = "/opt/base-worker/functions/e2e_functions.py"
NOT_COPIED = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "bench")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(port: int, slots: int = 3) -> str:
    """No state_dir: the daemon takes $STATE_DIRECTORY from the unit's StateDirectory=."""
    return f"""\
[worker]
slots = {slots}
drain_timeout = 30.0
functions = ["worker.examples", "{FUNCTIONS_FILE}"]

[http]
host = "127.0.0.1"
port = {port}

[auth]
auth_key = "{AUTH_KEY}"

[logging]
level = "info"

[load_balancer]
websocket_port = 0
"""


# Never through a proxy: every request goes to this machine's loopback only.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    port: int, method: str, path: str, body: Any = None, auth: bool = True, timeout: float = 30
) -> tuple[int, Any]:
    """One request to the worker on 127.0.0.1; (status, decoded JSON body)."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = AUTH_KEY
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers
    )
    try:
        with _opener.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"null")


def health(port: int) -> dict[str, Any]:
    status, body = http(port, "GET", "/health", timeout=5)
    assert status == 200, body
    return dict(body)


def task(port: int, function: str, params: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
    body = {"function": function, "input": params, "contract": 1}
    return http(port, "POST", "/task", body, timeout=timeout)


class Worker:
    """The container with base-worker installed, and the knobs the tests turn."""

    def __init__(self, box: Container, port: int):
        self.box = box
        self.port = port

    def configure(self, slots: int = 3) -> None:
        self.box.write(
            "/etc/base-worker/config.toml",
            config(self.port, slots),
            mode="0640",
            owner="root:base-worker",
        )

    def systemctl(self, *args: str) -> None:
        proc = self.box.run("systemctl", *args, check=False)
        if proc.returncode != 0:
            recent = self.box.run("journalctl", "--no-pager", "-n", "60", check=False).stdout
            pytest.fail(f"systemctl {' '.join(args)}: {proc.stderr}\n{recent}")

    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        return self.box.show(unit, *props)

    def journal(self, *args: str, unit: str = UNIT) -> str:
        cmd = ("journalctl", "--no-pager", "-o", "cat", "-u", unit, *args)
        return self.box.run(*cmd, check=False).stdout

    def running(self, slots: int = 3) -> None:
        """The service active on a fresh config with `slots` slots."""
        self.configure(slots)
        self.systemctl("restart", UNIT)
        assert self.show("ActiveState")["ActiveState"] == "active"
        wait_for(lambda: health(self.port)["status"] == "ready", 30, "/health to say ready")


def build_wheels(source: Path, out: Path, scratch: Path) -> None:
    """Wheels of the project and its dependencies, built on the host (PyPI is reachable here)."""
    # Build from a copy: an in-tree build leaves build/ behind, whose stale files reach the wheel.
    tree = scratch / "src"
    shutil.copytree(source, tree, ignore=shutil.ignore_patterns(*NOT_COPIED))
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*cmd, "--wheel-dir", str(out), str(tree)], check=True, timeout=480)


@pytest.fixture(scope="module")
def worker(nspawn_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    source = Path(os.environ.get("BASE_WORKER_E2E_SOURCE", REPO))
    wheels = tmp_path_factory.mktemp("wheels")
    build_wheels(source, wheels, tmp_path_factory.mktemp("build"))
    with booted(nspawn_root, binds=[(wheels, "/mnt/wheels")]) as box:
        box.run("python3", "-m", "venv", "/opt/base-worker")
        pip = ("/opt/base-worker/bin/pip", "install", "--quiet", "--disable-pip-version-check")
        box.run(*pip, "--no-index", "--find-links", "/mnt/wheels", "base-worker", timeout=300)
        box.write(FUNCTIONS_FILE, (HERE / "e2e_functions.py").read_text())
        for unit in ("base-worker.service", "base-worker@.service", "base-worker.socket"):
            box.write(f"/etc/systemd/system/{unit}", (REPO / "systemd" / unit).read_text())
        sysusers = (REPO / "systemd/base-worker.sysusers").read_text()
        box.write("/etc/sysusers.d/base-worker.conf", sysusers)
        box.run("systemd-sysusers")
        box.run("systemctl", "daemon-reload")
        result = Worker(box, free_port())
        result.configure()
        yield result


def test_units_verify_and_rate_in_place(worker: Worker) -> None:
    """Where /opt/base-worker really exists, verify needs no stub, and the loaded unit is rated."""
    for unit in ("base-worker.service", "base-worker@example.service", "base-worker.socket"):
        proc = worker.box.run("systemd-analyze", "verify", unit, check=False)
        assert (proc.returncode, proc.stdout + proc.stderr) == (0, ""), unit
    out = worker.box.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    assert float(match.group(1)) <= 1.5, out


def test_start_is_active_with_status(worker: Worker) -> None:
    worker.configure()
    worker.systemctl("start", UNIT)  # returns once the daemon sent READY=1
    state = worker.show("ActiveState", "SubState", "StatusText", "Type", "User")
    assert state["ActiveState"] == "active", worker.journal()
    assert state["SubState"] == "running"
    assert state["StatusText"].strip(), state
    assert health(worker.port)["status"] == "ready"
    assert task(worker.port, "hello", {"name": "systemd"}) == (
        200,
        {"success": True, "result": {"message": "Hello systemd!"}},
    )
    # The daemon runs as the unprivileged service user, not root.
    pid = worker.show("MainPID")["MainPID"]
    owner = worker.box.run("stat", "-c", "%U", f"/proc/{pid}").stdout.strip()
    assert owner == "base-worker"


def test_reload_applies_slot_count(worker: Worker) -> None:
    worker.running(slots=3)
    pid = worker.show("MainPID")["MainPID"]
    assert health(worker.port)["slots"]["limit"] == 3
    worker.configure(slots=7)
    worker.systemctl("reload", UNIT)
    wait_for(lambda: health(worker.port)["slots"]["limit"] == 7, 30, "slots.limit to become 7")
    state = worker.show("ActiveState", "MainPID")
    assert state == {"ActiveState": "active", "MainPID": pid}, "reload must not restart"


def test_maintenance_survives_restart(worker: Worker) -> None:
    """Maintenance mode is kept in the unit's StateDirectory=, writable under the sandbox."""
    worker.running()
    assert http(worker.port, "POST", "/off")[0] == 200
    worker.systemctl("restart", UNIT)
    wait_for(
        lambda: health(worker.port)["status"] == "maintenance", 30, "maintenance after restart"
    )
    assert http(worker.port, "POST", "/on")[0] == 200
    assert health(worker.port)["status"] == "ready"


def test_stop_lets_running_tasks_answer(worker: Worker) -> None:
    worker.running(slots=3)
    with ThreadPoolExecutor(max_workers=3) as pool:
        calls = [pool.submit(task, worker.port, "sleepy", {"seconds": 2}) for _ in range(3)]
        wait_for(lambda: health(worker.port)["slots"]["used"] == 3, 10, "3 busy slots")
        worker.systemctl("stop", UNIT)  # returns once the process has exited
        answers = [call.result(timeout=30) for call in calls]
    assert answers == [(200, {"success": True, "result": {"slept": 2}})] * 3
    state = worker.show("ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}


def test_watchdog_restarts_a_stalled_process(worker: Worker) -> None:
    worker.running()
    before = worker.show("MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] not in ("0", "infinity", ""), before
    worker.box.run("kill", "-STOP", before["MainPID"])

    def restarted() -> bool:
        now = worker.show("ActiveState", "MainPID", "NRestarts")
        return (
            now["ActiveState"] == "active"
            and now["MainPID"] not in ("0", before["MainPID"])
            and int(now["NRestarts"]) == int(before["NRestarts"]) + 1
        )

    wait_for(restarted, 60, "the watchdog to kill and restart the stalled daemon", interval=0.5)
    assert "Watchdog timeout" in worker.journal()
    wait_for(lambda: health(worker.port)["status"] == "ready", 30, "/health after the restart")


def test_journal_priority_filter(worker: Worker) -> None:
    worker.running()
    marker = uuid.uuid4().hex
    assert task(worker.port, "log_marker", {"marker": marker})[0] == 200

    def warning_logged() -> str | None:
        out = worker.journal("-p", "warning")
        return out if f"e2e-warning {marker}" in out else None

    warnings = wait_for(warning_logged, 30, "the warning line in the journal")
    assert f"e2e-info {marker}" in worker.journal(), "info line missing from the full journal"
    assert f"e2e-info {marker}" not in warnings, "journalctl -p warning shows an info line"


def test_template_instance(worker: Worker) -> None:
    """base-worker@NAME.service: its own config /etc/base-worker/NAME.toml and state directory."""
    port = free_port()
    text = config(port, slots=2)
    worker.box.write("/etc/base-worker/second.toml", text, mode="0640", owner="root:base-worker")
    unit = "base-worker@second.service"
    try:
        worker.systemctl("start", unit)
        assert worker.show("ActiveState", unit=unit)["ActiveState"] == "active"
        assert health(port)["slots"]["limit"] == 2
        assert http(port, "POST", "/off")[0] == 200  # writes into its own StateDirectory
        listing = worker.box.run("ls", "/var/lib/base-worker/second").stdout
        assert listing.strip(), "the instance's state directory is empty"
    finally:
        worker.systemctl("stop", unit)


def test_socket_activation(worker: Worker) -> None:
    """base-worker.socket binds the port; the first connection starts the service on it."""
    worker.systemctl("stop", UNIT)
    port = free_port()
    worker.box.write(
        "/etc/systemd/system/base-worker.socket.d/port.conf",
        f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n",
    )
    worker.systemctl("daemon-reload")
    try:
        worker.systemctl("start", "base-worker.socket")
        assert worker.show("ActiveState")["ActiveState"] == "inactive"
        # This first connection starts the service, which takes the listening socket over.
        try:
            status, body = http(port, "GET", "/health", timeout=60)
        except OSError as error:
            recent = worker.box.run("journalctl", "--no-pager", "-n", "40", check=False).stdout
            pytest.fail(f"no answer through the activated socket: {error!r}\n{recent}")
        assert (status, body["status"]) == (200, "ready")
        assert worker.show("ActiveState")["ActiveState"] == "active"
        assert task(port, "hello", {"name": "socket"})[0] == 200
    finally:
        worker.systemctl("stop", "base-worker.socket", UNIT)
        worker.box.run("rm", "-r", "/etc/systemd/system/base-worker.socket.d")
        worker.systemctl("daemon-reload")
