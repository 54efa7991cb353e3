"""Issue #10, webhook half: what a task may send, where, and what the worker logs of it."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import structlog

from tests.conftest import AUTH, Worker, make_config, task, wait_for
from tests.test_webhooks import Start, health, receiver, webhook_config
from worker.errors import ConfigError

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
        ("deep_result", {"depth": 1000}, "nested too deeply"),
        ("deep_result", {"depth": 50000}, "nested too deeply"),
        ("nan_result", {}, "NaN or Infinity"),
        ("infinite_result", {}, "NaN or Infinity"),
        ("infinite_result", {"sign": -1}, "NaN or Infinity"),
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
    assert (await health(client))["webhooks"] == {"pending": 0, "delivered": 1, "failed": 0}
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
