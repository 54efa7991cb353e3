"""The command line as a sysadmin runs it: `--check`, `--version`, and flags reaching the daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import unused_port

from tests.conftest import AUTH_KEY, ROOT, TEST_FUNCTIONS
from tests.test_config import clean_env

pytestmark = pytest.mark.timeout(60)


def config_file(tmp_path: Path, functions: list[str], extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"[worker]\nfunctions = {json.dumps(functions)}\n{extra}\n"
        f'[http]\nhost = "127.0.0.1"\nport = 0\n'
        f'[auth]\nauth_key = "{AUTH_KEY}"\n'
        f"[load_balancer]\nwebsocket_port = 0\n"
    )
    return path


def run(*args: str, program: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(program or [sys.executable, "-m", "worker"]), *args],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_prints_the_function_names_and_exits_0(tmp_path: Path) -> None:
    path = config_file(tmp_path, ["worker.examples", TEST_FUNCTIONS])
    result = run("--check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    names = result.stdout.split()
    assert names[0] == "hello"
    assert {"wait_gate", "typed", "block", "chunks", "flaky"} <= set(names)


def test_check_of_the_example_config_and_the_console_script() -> None:
    script = str(Path(sys.executable).parent / "base-worker")
    for program in ([sys.executable, "-m", "worker"], [script]):
        result = run("--check", "--config", "config.example.toml", program=program)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "hello\n"


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("base-worker ")


def assert_check_fails(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert message.startswith("base-worker: "), message
    for part in expected:
        assert part in message, message
    assert result.stdout == ""


def test_check_fails_for_a_module_that_does_not_import(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_dependency_for_base_worker\n")
    result = run("--check", "--config", str(config_file(tmp_path, [str(broken)])))
    assert_check_fails(result, str(broken), "ModuleNotFoundError", "no_such_dependency")


def test_check_fails_for_a_module_name_that_does_not_exist(tmp_path: Path) -> None:
    path = config_file(tmp_path, ["worker.examples", "no_such_functions_module"])
    assert_check_fails(run("--check", "--config", str(path)), "no_such_functions_module")


def test_check_fails_for_two_functions_with_one_name(tmp_path: Path) -> None:
    functions = tmp_path / "functions"
    functions.mkdir()
    for name in ("a.py", "b.py"):
        (functions / name).write_text(
            "from worker import function\n\n@function\nasync def twin(params, ctx):\n    return 1\n"
        )
    result = run("--check", "--config", str(config_file(tmp_path, [str(functions)])))
    assert_check_fails(result, "'twin'", "defined twice")


def test_check_fails_for_a_bad_config_too(tmp_path: Path) -> None:
    path = config_file(tmp_path, ["worker.examples"], extra="slots = 0")
    assert_check_fails(run("--check", "--config", str(path)), "worker.slots")


def detailed_health(port: int) -> dict[str, Any] | None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/health", headers={"Authorization": AUTH_KEY}
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as answer:
            body: dict[str, Any] = json.loads(answer.read())
            return body
    except (urllib.error.URLError, ConnectionError):
        return None


def test_flags_beat_environment_beat_file_in_the_running_daemon(tmp_path: Path) -> None:
    file_port, env_port, flag_port = unused_port(), unused_port(), unused_port()
    path = config_file(tmp_path, ["worker.examples"], extra='slots = 2\ngroup = "from-file"')
    text = path.read_text().replace("port = 0", f"port = {file_port}")
    path.write_text(text)
    env = clean_env(SLOTS="3", PORT=str(env_port), GROUP="from-env", CONTRACT="5")
    flags = ["--slots", "4", "--port", str(flag_port)]
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(path), *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        body = detailed_health(flag_port)
        while body is None:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the daemon did not answer /health in time"
            time.sleep(0.05)  # polling a subprocess: there is no event to wait on
            body = detailed_health(flag_port)
        assert body["slots"]["limit"] == 4  # flag over SLOTS over the file
        assert body["group"] == "from-env"  # environment over the file
        assert body["contract"] == 5  # environment over the default
        assert detailed_health(env_port) is None and detailed_health(file_port) is None
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
    assert process.returncode == 0, output
    assert AUTH_KEY not in output
    assert "base-worker started" in output and "stopped" in output
