"""Property-based fuzzing of the running daemon from its own OpenAPI document (schemathesis).

Requests are generated from `/openapi` for the endpoints that parse input (POST /task, GET
/health, GET /logs without follow) and sent to a real daemon on loopback. Every answer must be in
the document (status, content type, body schema) and none may be a 5xx: the daemon serves only
`hello`, which never fails, so any 5xx is the daemon's own fault. Webhook URLs are pointed at a
sink on loopback before sending: the daemon never reaches out anywhere else.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from aiohttp.test_utils import unused_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import AUTH_KEY, LB_KEY, ROOT
from tests.daemon import write_config
from worker.envelope import WebhookSchema

EXAMPLES = 60  # per operation; the whole module stays well under a minute


class _Sink(http.server.BaseHTTPRequestHandler):
    """A webhook receiver that takes anything."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def sink() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("fuzz")
    port = unused_port()
    write_config(
        home / "config.toml",
        worker={"functions": ["worker.examples"]},
        http={"port": port},
        webhook={"max_retries": 0, "timeout": 2.0},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))}
    env["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(home / "config.toml")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not _answers(f"{url}/health"):
            assert process.poll() is None, "the daemon exited"
            assert time.monotonic() < deadline, "the daemon did not answer /health in time"
            time.sleep(0.05)  # another process: no event to wait on
        yield url
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        if process.poll() is None:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture(scope="module")
def api_schema(daemon_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{daemon_url}/openapi")


OPERATIONS = [("/task", "POST"), ("/health", "GET"), ("/logs", "GET")]


@pytest.mark.timeout(120)
def test_every_answer_is_in_the_document_and_none_is_a_5xx(
    api_schema: Any, daemon_url: str, sink: str
) -> None:
    cases = st.one_of([api_schema[path][method].as_strategy() for path, method in OPERATIONS])
    seen: set[int] = set()

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES * len(OPERATIONS),
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def answer_is_documented(case: Any) -> None:
        headers = {"Authorization": AUTH_KEY}
        if case.path == "/logs":
            case.query = {**(case.query or {}), "follow": "0"}  # a follow never ends by itself
            headers = {"x-lb-auth": LB_KEY}
        webhook = case.body.get("webhook") if isinstance(case.body, dict) else None
        if isinstance(webhook, dict) and not WebhookSchema().validate({"url": webhook.get("url")}):
            # A URL the daemon would accept goes to the sink: loopback only, whatever was
            # generated. One it refuses stays, and must be refused with a documented 400.
            webhook["url"] = sink
        response = case.call_and_validate(
            base_url=daemon_url,
            headers=headers,
            timeout=10,
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
        )
        seen.add(response.status_code)

    answer_is_documented()
    # The fuzz reached past validation: some tasks ran, some were refused.
    assert 200 in seen and 400 in seen, seen
