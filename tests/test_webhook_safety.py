"""Issue #10, webhook half: what a task may send, where, and what the worker logs of it."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import json
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer, unused_port

from tests.conftest import AUTH, AUTH_KEY, Worker, make_config, task, wait_for
from tests.daemon import Daemon, poll, post_task
from tests.daemon import health as daemon_health
from tests.test_webhooks import SECRET, Start, health, receiver, webhook_config
from worker.errors import ConfigError
from worker.targets import TargetPolicy, TargetRefused, header_target_matches
from worker.webhooks import PolicyResolver

StartWorker = Callable[..., Awaitable[Worker]]
__all__ = ["receiver"]  # the fixture, shared with tests/test_webhooks.py

FORBIDDEN = [
    "Host",
    "content-length",
    "Transfer-Encoding",
    "Connection",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Upgrade",
    "Proxy-Authorization",
    "Content-Type",
    "User-Agent",
    "X-Task-Id",
    "X-Signature-256",
    "X-Webhook-Attempt",
]
VALUE = "value-that-must-not-be-echoed"


async def post(client: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with client.post("/task", json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("name", FORBIDDEN)
async def test_a_task_may_not_set_the_workers_own_headers(
    worker_app: StartWorker, receiver: Start, name: str
) -> None:
    hook = await receiver([])
    client, runtime = await worker_app(webhook=webhook_config())
    body = task("hello", mode="webhook", webhook={"url": hook.url, "headers": {name: VALUE}})
    status, answer = await post(client, body)
    assert status == 400
    messages = answer["details"]["webhook"]["headers"]
    assert any(name in message for message in messages)
    assert VALUE not in repr(answer)
    assert runtime.dispatcher.in_flight == 0 and hook.calls == []


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"X-Ok: 1\r\nX-Task-Id": VALUE}, "X-Ok"),
        ({"X-Evil: x": VALUE}, "X-Evil"),
        ({"": VALUE}, "''"),
        ({"X Space": VALUE}, "X Space"),
        ({"X-Crlf": "a\r\nX-Task-Id: forged"}, "X-Crlf"),
        ({"X-Lf": "a\nb"}, "X-Lf"),
        ({"X-Nul": "a\x00b"}, "X-Nul"),
    ],
)
async def test_header_names_must_be_tokens_and_values_free_of_cr_lf_nul(
    worker_app: StartWorker, receiver: Start, headers: dict[str, str], named: str
) -> None:
    hook = await receiver([])
    client, runtime = await worker_app(webhook=webhook_config())
    body = task("hello", mode="webhook", webhook={"url": hook.url, "headers": headers})
    status, answer = await post(client, body)
    assert status == 400, answer
    messages = answer["details"]["webhook"]["headers"]
    assert any(named in message for message in messages), messages
    for value in headers.values():
        assert value not in repr(answer)
    assert "forged" not in repr(answer)
    assert runtime.dispatcher.in_flight == 0 and hook.calls == []


async def test_every_bad_header_is_reported_at_once(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver([])
    client, _ = await worker_app(webhook=webhook_config())
    headers = {"Host": VALUE, "Content-Length": "3", "X-Fine": "ok"}
    body = task("hello", mode="webhook", webhook={"url": hook.url, "headers": headers})
    status, answer = await post(client, body)
    assert status == 400
    messages = answer["details"]["webhook"]["headers"]
    assert len(messages) == 2
    assert "Host" in messages[0] and "Content-Length" in messages[1]


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Length": "3"},
        {"Host": "elsewhere.example"},
        {"X-Webhook-Signature": "t=1,v1=00"},
        {"X-Bad: name": "x"},
        {"X-Value": "a\r\nb"},
    ],
)
def test_configured_headers_obey_the_same_rules(headers: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(webhook={"headers": headers})
    message = str(caught.value)
    assert "webhook.headers" in message
    assert "\n" not in message
    name = next(iter(headers))
    assert name.split(":")[0] in message
    assert headers[name] not in message


def test_allowed_headers_pass_config_and_validation() -> None:
    cfg = make_config(webhook={"headers": {"Authorization": "Bearer x", "X-Api-Key": "k"}})
    assert dict(cfg.webhook.headers) == {"Authorization": "Bearer x", "X-Api-Key": "k"}


async def deliver_one(client: Any, runtime: Any, hook: Any, body: dict[str, Any]) -> Any:
    """Submit one webhook task and wait until it is delivered or given up."""
    before = runtime.deliveries.delivered + runtime.deliveries.failed
    status, answer = await post(client, {**body, "mode": "webhook", "webhook": {"url": hook.url}})
    assert status == 202, answer
    await wait_for(lambda: runtime.deliveries.delivered + runtime.deliveries.failed > before)
    return answer["task_id"]


@pytest.mark.parametrize(
    ("function", "params", "cause"),
    [
        ("nested_result", {"depth": 1000}, "nested too deeply"),
        ("nested_result", {"depth": 50000}, "nested too deeply"),
        ("nan_result", {}, "NaN or infinite number"),
        ("infinite_result", {}, "NaN or infinite number"),
        ("infinite_result", {"sign": -1}, "NaN or infinite number"),
        ("not_json", {}, "not JSON serializable"),
        ("unreadable_result", {}, "cannot read this result"),
    ],
)
async def test_a_result_that_is_not_json_is_delivered_as_a_failure(
    worker_app: StartWorker, receiver: Start, function: str, params: dict[str, Any], cause: str
) -> None:
    hook = await receiver([])
    client, runtime = await worker_app(webhook=webhook_config(max_retries=0))
    with structlog.testing.capture_logs() as logged:
        task_id = await deliver_one(client, runtime, hook, task(function, input=params))
    assert len(hook.calls) == 1
    delivered = json.loads(hook.calls[0].body)  # valid JSON: no NaN, no Infinity
    assert delivered["task_id"] == task_id and delivered["success"] is False
    assert "result" not in delivered
    assert cause.lower() in delivered["error"].lower()
    assert (await health(client))["webhooks"] == {
        "pending": 0,
        "delivered": 1,
        "failed": 0,
        "dead": 0,
    }
    assert [line["event"] for line in logged if line["event"] == "webhook delivered"] == [
        "webhook delivered"
    ]
    # The task's own summary line too (its debug view of the result is bounded).
    assert [line["outcome"] for line in logged if line["event"] == "task"] == ["succeeded"]


async def test_a_result_over_max_result_bytes_is_delivered_as_a_failure(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver([])
    client, runtime = await worker_app(webhook=webhook_config(max_result_bytes=1000))
    await deliver_one(client, runtime, hook, task("sized_result", input={"size": 800}))
    await deliver_one(client, runtime, hook, task("sized_result", input={"size": 1001}))
    small, large = (json.loads(call.body) for call in hook.calls)
    assert small["success"] is True and small["result"] == "x" * 800
    assert large["success"] is False and "result" not in large
    assert "webhook.max_result_bytes" in large["error"] and "1000" in large["error"]
    assert len(hook.calls[1].body) < 1000


def test_max_result_bytes_defaults_to_10_mib_and_takes_sizes() -> None:
    assert make_config().webhook.max_result_bytes == 10 * 1024 * 1024
    assert make_config(webhook={"max_result_bytes": "1mb"}).webhook.max_result_bytes == 1024**2


@pytest.mark.parametrize(
    ("url", "settings", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", {}, "link-local"),
        ("http://[fe80::1]:8080/", {}, "link-local"),
        ("http://0.0.0.0:{port}/hook", {}, "unspecified"),
        ("http://224.0.0.1/", {}, "multicast"),
        ("http://127.0.0.1:22/", {"deny": ["127.0.0.0/8"]}, "webhook.deny"),
        ("http://127.0.0.1:{port}/hook", {"allow": ["10.0.0.0/8"]}, "webhook.allow"),
        ("http://denied.test/hook", {"deny": ["denied.test"]}, "webhook.deny"),
    ],
)
async def test_a_target_refused_at_submit_is_a_400_under_webhook_url(
    worker_app: StartWorker, receiver: Start, url: str, settings: dict[str, Any], reason: str
) -> None:
    hook = await receiver([])
    assert hook.server is not None
    client, runtime = await worker_app(webhook=webhook_config(**settings))
    target = url.format(port=hook.server.port) + "?token=SECRET"
    body = task("hello", mode="webhook", webhook={"url": target})
    status, answer = await post(client, body)
    assert status == 400, answer
    messages = answer["details"]["webhook"]["url"]
    assert any(reason in message for message in messages), messages
    assert "SECRET" not in repr(answer)
    assert runtime.dispatcher.in_flight == 0 and hook.calls == []


async def undelivered_at_once(
    client: Any, runtime: Any, target: str, reason: str
) -> list[dict[str, Any]]:
    with structlog.testing.capture_logs() as logged:
        status, answer = await post(client, task("hello", mode="webhook", webhook={"url": target}))
        assert status == 202, answer
        await wait_for(lambda: runtime.deliveries.failed == 1)
    undelivered = [line for line in logged if line["event"] == "webhook undelivered"]
    assert len(undelivered) == 1 and undelivered[0]["attempts"] == 1
    assert reason in undelivered[0]["error"]
    assert not [line for line in logged if line["event"] == "webhook attempt failed"][1:]
    assert (await health(client))["webhooks"]["delivered"] == 0
    return logged


async def test_a_name_that_resolves_to_the_workers_own_port_fails_at_once(
    worker_app: StartWorker,
) -> None:
    client, runtime = await worker_app(webhook=webhook_config())
    # The worker's own listener, by a name: refused once resolved, before any connection.
    target = f"http://localhost:{client.port}/task"
    served = runtime.worker.metrics.requests.copy()
    await undelivered_at_once(client, runtime, target, "own port")
    posts = {key: n for key, n in (runtime.worker.metrics.requests - served).items()}
    assert {key for key in posts if key[0] == "/task"} == {("/task", 202)}  # none delivered
    assert posts["/task", 202] == 1


async def test_a_name_that_resolves_to_a_denied_address_fails_at_once(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver([])
    assert hook.server is not None
    client, runtime = await worker_app(webhook=webhook_config(deny=["127.0.0.0/8", "::1"]))
    target = f"http://localhost:{hook.server.port}/hook"
    await undelivered_at_once(client, runtime, target, "webhook.deny")
    assert hook.calls == []


async def test_the_policy_is_checked_again_at_every_attempt(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver(["hang"])
    client, runtime = await worker_app(webhook=webhook_config(timeout=0.5, retry_delay=0.01))
    status, _ = await post(client, task("hello", mode="webhook", webhook={"url": hook.url}))
    assert status == 202
    await wait_for(lambda: len(hook.calls) == 1)
    runtime.apply(make_config(webhook=webhook_config(deny=["127.0.0.0/8"])))
    await wait_for(lambda: runtime.deliveries.failed == 1)
    assert len(hook.calls) == 1


async def test_redirects_are_never_followed(
    worker_app: StartWorker, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    calls: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(status=307, headers={"Location": "/elsewhere"})

    async def elsewhere(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/redirect", redirect)
    app.router.add_post("/elsewhere", elsewhere)
    server = await aiohttp_server(app, host="127.0.0.1")
    client, runtime = await worker_app(webhook=webhook_config())
    await undelivered_at_once(client, runtime, str(server.make_url("/redirect")), "HTTP 307")
    assert calls == ["/redirect"]


class FakeDNS(AbstractResolver):
    """Answers every name with the addresses it was given; records what it was asked."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_the_resolver_keeps_only_allowed_addresses_and_refuses_when_none_is() -> None:
    policy = TargetPolicy([], ["192.0.2.7"])
    mixed = PolicyResolver(lambda: policy, FakeDNS("169.254.169.254", "192.0.2.1", "192.0.2.7"))
    assert [r["host"] for r in await mixed.resolve("hooks.test", 80)] == ["192.0.2.1"]
    metadata = PolicyResolver(lambda: policy, FakeDNS("169.254.169.254", "fe80::1%2"))
    with pytest.raises(TargetRefused, match="link-local"):
        await metadata.resolve("metadata.test", 80)


async def test_a_session_never_connects_to_a_refused_resolved_address() -> None:
    # The delivery session's wiring, with a fake DNS answering a metadata address: refused
    # with the reason before any connection is attempted. The socket factory refuses too, so
    # even a broken policy could not send a packet anywhere.
    dns = FakeDNS("169.254.169.254")
    policy = TargetPolicy([], [])
    sockets: list[Any] = []

    def no_socket(addr_info: Any) -> socket.socket:
        sockets.append(addr_info)
        raise OSError("this test opens no socket")

    connector = aiohttp.TCPConnector(
        resolver=PolicyResolver(lambda: policy, dns),
        use_dns_cache=False,
        force_close=True,
        socket_factory=no_socket,
    )
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(2):  # every attempt resolves and checks again
            with pytest.raises(aiohttp.ClientConnectorError) as caught:
                await session.post("http://metadata.test/latest", data=b"{}")
            assert isinstance(caught.value.os_error, TargetRefused)
            assert "link-local" in str(caught.value.os_error)
    assert dns.asked == ["metadata.test", "metadata.test"]
    assert sockets == []


async def test_the_daemon_cannot_be_told_to_switch_itself_off(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, webhook={"max_retries": 2, "retry_delay": 0.01})
    try:
        await daemon.start()
        await daemon.wait_ready()
        async with aiohttp.ClientSession() as session:
            own = {"Authorization": AUTH_KEY}
            by_literal = {"url": f"{daemon.url}/off", "headers": own}
            status, answer = await post_task(
                session, daemon, task("hello", mode="webhook", webhook=by_literal)
            )
            assert status == 400 and "own port" in repr(answer["details"]["webhook"]["url"])
            by_name = {"url": f"http://localhost:{daemon.port}/off", "headers": own}
            status, _ = await post_task(
                session, daemon, task("hello", mode="webhook", webhook=by_name)
            )
            assert status == 202

            async def failed() -> bool:
                return bool((await daemon_health(session, daemon))["webhooks"]["failed"] == 1)

            await poll(failed)
            assert (await daemon_health(session, daemon))["status"] == "ready"
    finally:
        await daemon.stop()
    undelivered = [json.loads(line) for line in daemon.log_events() if "undelivered" in line]
    assert len(undelivered) == 1 and "own port" in undelivered[0]["error"]
    assert undelivered[0]["attempts"] == 1
    assert not [line for line in daemon.log_events() if "maintenance mode enabled" in line]


async def test_no_log_line_holds_a_targets_query_fragment_or_userinfo(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    async def fails(request: web.Request) -> web.Response:
        return web.Response(status=500, text="receiver failed")

    app = web.Application()
    app.router.add_post("/hook", fails)
    server = await aiohttp_server(app, host="127.0.0.1")

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()
        writer.close()

    not_http = await asyncio.start_server(garbage, "127.0.0.1", 0)
    not_http_port = not_http.sockets[0].getsockname()[1]
    daemon = Daemon(
        tmp_path, webhook={"max_retries": 1, "retry_delay": 0.01}, logging={"level": "debug"}
    )
    secret = "user:pw@{where}?token=SECRET#frag"
    targets = [
        f"http://{secret.format(where=f'127.0.0.1:{server.port}/hook')}",  # answers 500
        f"http://{secret.format(where=f'127.0.0.1:{unused_port()}/closed')}",  # nobody there
        "http://" + secret.format(where="localhost:{port}/off"),  # refused after resolution
        f"http://{secret.format(where=f'127.0.0.1:{not_http_port}/x')}",  # answers garbage
        "http://" + secret.format(where="169.254.169.254/latest"),  # refused at submit
    ]
    try:
        await daemon.start()
        await daemon.wait_ready()
        async with aiohttp.ClientSession() as session:
            statuses = []
            for target in targets:
                webhook = {"url": target.replace("{port}", str(daemon.port))}
                status, answer = await post_task(
                    session, daemon, task("hello", mode="webhook", webhook=webhook)
                )
                statuses.append(status)
                assert "SECRET" not in repr(answer) and "frag" not in repr(answer)

            async def settled() -> bool:
                return bool((await daemon_health(session, daemon))["webhooks"]["failed"] == 4)

            await poll(settled)
            async with session.get(
                f"{daemon.url}/logs", headers={"Authorization": AUTH_KEY}
            ) as resp:
                logs = (await resp.json())["logs"]
    finally:
        await daemon.stop()
        not_http.close()
    assert statuses == [202, 202, 202, 202, 400]
    undelivered = [line for line in daemon.output if "webhook undelivered" in line]
    assert len(undelivered) == 4
    for text in (*daemon.output, *logs):
        for word in ("SECRET", "pw", "frag", "token"):
            assert word not in text, text
    # What is logged of a target: scheme, host, port and path.
    assert any(f"http://127.0.0.1:{server.port}/hook" in line for line in undelivered)


async def test_every_attempt_carries_its_number_a_timestamp_and_a_replay_proof_signature(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver([503, 503])
    client, runtime = await worker_app(webhook=webhook_config(retry_delay=0.01))
    before = int(time.time())
    task_id = await deliver_one(client, runtime, hook, task("hello"))
    after = int(time.time())
    assert len(hook.calls) == 3
    for number, call in enumerate(hook.calls, start=1):
        headers = call.headers
        assert headers["X-Webhook-Attempt"] == str(number)
        assert headers["X-Task-Id"] == task_id
        stamp = headers["X-Webhook-Timestamp"]
        assert stamp.isdigit() and before <= int(stamp) <= after
        signed = stamp.encode() + b"." + call.body
        expected = hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
        assert headers["X-Webhook-Signature"] == f"t={stamp},v1={expected}"
        kept = hmac.new(SECRET.encode(), call.body, hashlib.sha256).hexdigest()
        assert headers["X-Signature-256"] == f"sha256={kept}"


async def test_without_a_secret_nothing_is_signed_but_attempts_are_numbered(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver([])
    client, runtime = await worker_app(webhook=webhook_config(secret=""))
    await deliver_one(client, runtime, hook, task("hello"))
    headers = hook.calls[0].headers
    assert headers["X-Webhook-Attempt"] == "1"
    assert headers["X-Webhook-Timestamp"].isdigit()
    assert "X-Webhook-Signature" not in headers and "X-Signature-256" not in headers


async def test_configured_headers_go_only_to_header_targets(
    worker_app: StartWorker, receiver: Start
) -> None:
    home = await receiver([])
    away = await receiver([])
    assert home.server is not None
    prefix = f"http://127.0.0.1:{home.server.port}/hook"
    client, runtime = await worker_app(webhook=webhook_config(header_targets=[prefix]))
    own = {"X-Custom": "from-task"}
    for hook in (home, away):
        body = task("hello", mode="webhook", webhook={"url": hook.url, "headers": own})
        status, _ = await post(client, body)
        assert status == 202
    await wait_for(lambda: runtime.deliveries.delivered == 2)
    assert home.calls[0].headers["X-Default"] == "from-config"
    assert "X-Default" not in away.calls[0].headers
    assert "X-Override" not in away.calls[0].headers
    assert away.calls[0].headers["X-Custom"] == "from-task"


@pytest.mark.parametrize(
    ("prefix", "url", "sent"),
    [
        ("https://api.example.com", "https://api.example.com/hooks?x=1", True),
        ("https://api.example.com", "https://API.example.com:443/", True),
        ("https://api.example.com", "https://api.example.com.evil.test/", False),
        ("https://api.example.com", "https://api.example.com@evil.test/", False),
        ("https://api.example.com", "https://api.example.com:x@evil.test/", False),
        ("https://api.example.com", "http://api.example.com/", False),
        ("https://api.example.com", "https://api.example.com:8443/", False),
        ("https://api.example.com/hooks", "https://api.example.com/hooks/1", True),
        ("https://api.example.com/hooks", "https://api.example.com/hooks", True),
        ("https://api.example.com/hooks", "https://api.example.com/hooksevil", False),
        ("https://api.example.com/hooks/", "https://api.example.com/hooks/1", True),
    ],
)
def test_header_targets_match_origin_then_path_prefix(prefix: str, url: str, sent: bool) -> None:
    assert header_target_matches(url, prefix) is sent


@pytest.mark.parametrize(
    "prefix", ["api.example.com", "ftp://x.test/", "https://u:p@x.test/", "https://x.test/?a=1"]
)
def test_bad_header_targets_are_refused_at_config_load(prefix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(webhook={"header_targets": [prefix]})
    assert "webhook.header_targets" in str(caught.value)


async def test_the_daemon_warns_once_when_configured_headers_go_everywhere(
    tmp_path: Path,
) -> None:
    for index, header_targets in enumerate(([], ["https://hooks.example.org/"])):
        home = tmp_path / str(index)
        home.mkdir()
        daemon = Daemon(home, webhook={"header_targets": header_targets})
        try:
            await daemon.start(env={"WEBHOOK_HEADERS": json.dumps({"X-Api-Key": "k" * 20})})
            await daemon.wait_ready()
            # Stopped, not killed: its output is then read to the end (READY may come first).
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait_exit() == 0
        finally:
            await daemon.stop()
        warned = [line for line in daemon.output if "webhook.header_targets" in line]
        assert len(warned) == (0 if header_targets else 1), daemon.output


async def test_max_pending_bounds_webhook_tasks_queued_running_or_awaiting_delivery(
    worker_app: StartWorker, receiver: Start
) -> None:
    fast = await receiver([])
    slow = await receiver(["hang"])
    client, runtime = await worker_app(
        webhook=webhook_config(max_pending=3, timeout=30.0), worker={"slots": 1}
    )
    steer = runtime.registry.functions["wait_gate"].handler.__globals__
    gate_name = "max-pending"

    def submit(url: str, function: str = "hello", **params: Any) -> dict[str, Any]:
        return task(function, mode="webhook", input=params, webhook={"url": url})

    # One awaiting delivery (its receiver hangs), one running, one queued behind it.
    assert (await post(client, submit(slow.url)))[0] == 202
    await wait_for(lambda: len(slow.calls) == 1)
    assert (await post(client, submit(fast.url, "wait_gate", gate=gate_name)))[0] == 202
    await asyncio.wait_for(steer["started"](gate_name).wait(), 5)
    assert (await post(client, submit(fast.url, "wait_gate", gate=gate_name)))[0] == 202
    assert runtime.slots.state().queue == 1
    assert (await health(client))["webhooks"]["pending"] == 3

    async with client.post("/task", json=submit(fast.url), headers=AUTH) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        answer = await resp.json()
    assert "webhook.max_pending" in answer["error"]
    assert runtime.dispatcher.in_flight == 2 and runtime.slots.state().queue == 1
    steer["gate"](gate_name).set()
    await wait_for(lambda: len(fast.calls) == 2)
    await wait_for(lambda: runtime.deliveries.pending == 1)
    assert (await post(client, submit(fast.url)))[0] == 202
    await wait_for(lambda: len(fast.calls) == 3)


def test_max_pending_defaults_to_10000() -> None:
    assert make_config().webhook.max_pending == 10000


async def test_a_pending_delivery_keeps_the_encoded_bytes_not_the_result(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver(["hang"])
    client, runtime = await worker_app(webhook=webhook_config(timeout=30.0))
    tracked = runtime.registry.functions["tracked_result"].handler.__globals__["TRACKED"]
    tracked.clear()
    body = task("tracked_result", mode="webhook", webhook={"url": hook.url})
    assert (await post(client, body))[0] == 202
    await wait_for(lambda: len(hook.calls) == 1)
    assert runtime.deliveries.pending == 1
    gc.collect()
    assert tracked[0]() is None  # the value is gone; its bytes are being delivered
    assert json.loads(hook.calls[0].body)["result"] == {"data": "y" * 1000}


async def test_credentials_in_the_url_and_an_authorization_header_do_not_mix(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver([])
    assert hook.server is not None
    client, runtime = await worker_app(
        webhook=webhook_config(headers={"Authorization": "Bearer from-config"})
    )
    with_user = f"http://user:pw@127.0.0.1:{hook.server.port}/hook"
    both = {"url": with_user, "headers": {"Authorization": "Bearer from-task"}}
    status, answer = await post(client, task("hello", mode="webhook", webhook=both))
    assert status == 400
    assert any("Authorization" in m for m in answer["details"]["webhook"]["headers"])
    # The URL's credentials are the task's own: they win over the configured header.
    status, _ = await post(client, task("hello", mode="webhook", webhook={"url": with_user}))
    assert status == 202
    await wait_for(lambda: runtime.deliveries.delivered == 1)
    assert hook.calls[0].headers["Authorization"].startswith("Basic ")
