"""Issue #10, webhook half: what a task may send, where, and what the worker logs of it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import AUTH, Worker, make_config, task
from tests.test_webhooks import Start, receiver, webhook_config
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
