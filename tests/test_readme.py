"""The README's first promise, run as a reader would: `make run`, then its curl example."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp.test_utils import unused_port

from tests.conftest import ROOT
from tests.test_config import DAEMON_ENV

README = ROOT / "README.md"
# Make variables a caller's environment could set to run something else than the README says.
MAKE_ENV = {"CONFIG", "PYTHON", "VENV", "BIN"}


def readme_example() -> tuple[str, str]:
    """The curl command (continuation lines joined) and the answer printed below it."""
    text = README.read_text()
    block = re.search(r"```sh\n(curl .*?)```", text, re.DOTALL)
    assert block, "the README has no curl example"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    command = next(line for line in lines if line.startswith("curl "))
    answer = next(line for line in lines if line.startswith("# {"))
    return command, answer[2:]


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return bool(json.loads(answer.read()) == {"status": "ready"})
    except (urllib.error.URLError, ConnectionError, ValueError):
        return False


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.timeout(240)
def test_make_run_answers_the_readme_curl_example() -> None:
    readme_command, answer = readme_example()
    readme_url = next(w for w in shlex.split(readme_command) if w.startswith("http://"))
    readme_port = re.match(r"http://127\.0\.0\.1:(\d+)/", readme_url).group(1)  # type: ignore[union-attr]
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # The README's port may be busy on this machine: serve and ask on a free one instead, set
    # the way an operator would (PORT overrides the file).
    port = unused_port()
    command = readme_command.replace(f":{readme_port}/", f":{port}/")
    url = readme_url.replace(f":{readme_port}/", f":{port}/")

    env = {k: v for k, v in os.environ.items() if k not in DAEMON_ENV | MAKE_ENV}
    env["PORT"] = str(port)
    process = subprocess.Popen(
        ["make", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Generous: `make run` first installs into .venv when it is missing or stale.
        deadline = time.monotonic() + 180
        health = url.rsplit("/", 1)[0] + "/health"
        while not ready(health):
            if process.poll() is not None:
                output = process.communicate()[0].decode()
                if "address already in use" in output.lower():
                    pytest.skip(f"port {port} was taken while the daemon started")
                pytest.fail(f"make run exited with {process.returncode}:\n{output}")
            assert time.monotonic() < deadline, "make run did not serve /health in time"
            time.sleep(0.1)  # polling another process: there is no event to wait on

        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == answer

        # Stop the daemon the way systemd would, then make reports how it exited.
        (daemon,) = children_of(process.pid)
        os.kill(daemon, signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
        assert process.returncode == 0, output
        assert "base-worker started" in output and '"stopped"' in output
        assert "DEV-ONLY KEYS" in output  # the loud warning the README promises
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.communicate(timeout=30)
