"""Validating a POST /task body (worker/envelope.py): JSON parsing, the envelope schema and its
hand-checked shortcut, the order of the checks, and task ids."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from marshmallow import ValidationError

from tests.conftest import JSON_VALUES, TEST_FUNCTIONS
from worker import functions
from worker.envelope import (
    ENVELOPE,
    MAX_PRIORITY,
    new_task_id,
    parse_json,
    plain_envelope,
    task_ids,
    validate_task,
)
from worker.errors import BadRequest, NotFound
from worker.tasks import WebhookTarget

REGISTRY = functions.load(["worker.examples", TEST_FUNCTIONS])
GROUP = "default"
CONTRACT = 1

VALUES = JSON_VALUES  # every kind of JSON value, and the edges of the ranges


def schema_load(schema: Any, data: Any) -> Any:
    try:
        return schema.load(data)
    except ValidationError as exc:
        return ("error", exc.messages)


def validate(body: dict[str, Any]) -> Any:
    return validate_task(body, REGISTRY, GROUP, CONTRACT)


def refusal(body: dict[str, Any]) -> BadRequest | NotFound:
    with pytest.raises((BadRequest, NotFound)) as caught:
        validate(body)
    assert isinstance(caught.value, BadRequest | NotFound)
    return caught.value


# --- parse_json ----------------------------------------------------------------------------------


def test_parse_json_returns_the_object() -> None:
    assert parse_json(b'{"function": "hello", "n": [1, 2.5]}') == {
        "function": "hello",
        "n": [1, 2.5],
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "Request body is not valid JSON"),
        (b"", "Request body is not valid JSON"),
        (b"\xff\xfe{", "Request body is not valid JSON"),
        (b'{"n": NaN}', "Request body is not valid JSON"),
        (b"[-Infinity]", "Request body is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "Request body is nested too deeply"),
        (b"[1, 2]", "Request body must be a JSON object"),
        (b'"hello"', "Request body must be a JSON object"),
        (b"null", "Request body must be a JSON object"),
        (b"3", "Request body must be a JSON object"),
    ],
    ids=[
        "text",
        "empty",
        "not utf-8",
        "NaN",
        "Infinity",
        "nested too deeply",
        "array",
        "string",
        "null",
        "number",
    ],
)
def test_parse_json_refuses_with_a_400_saying_why(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_json(raw)
    assert caught.value.status == 400
    assert caught.value.message == message
    # `from None`: a decoder's internals never reach a trace.
    assert caught.value.__context__ is None or caught.value.__suppress_context__


# --- the shortcut for plainly valid envelopes agrees with the schema ------------------------------


def test_plain_envelope_agrees_with_the_schema() -> None:
    keys = ["function", "input", "contract", "priority", "mode", "group"]
    checked = 0
    for key in keys:
        for value in VALUES:
            body = {"function": "hello", "contract": 1, key: value}
            plain = plain_envelope(body)
            if plain is not None:
                assert plain == schema_load(ENVELOPE, body), body
                checked += 1
    assert checked > 20


@pytest.mark.parametrize(
    "body",
    [
        {"function": "hello", "contract": 1},
        {"function": "hello", "input": {"name": "Andera"}, "contract": 1},
        {"function": "f", "contract": 2, "priority": 7, "mode": "stream", "_taskId": "lb-1"},
        {"function": "f", "contract": 1, "group": "default"},
    ],
)
def test_common_envelopes_take_the_shortcut(body: dict[str, Any]) -> None:
    assert plain_envelope(body) == ENVELOPE.load(body)


URLS = [
    "http://x/",
    "http://127.0.0.1:9/hook",
    "https://receiver.example.com/a/b?c=d#e",
    "http://[::1]:8080/hook",
    "HTTP://Example.COM/",
    "http://user:pw@example.com/",
    "http://@example.com/",
    "ftp://example.com/",
    "example.com/hook",
    "/hook",
    "http://",
    "http:///x",
    "http://exa mple.com/",
    "http://example.com:99999/",
    "http://exämple.com/",
    "http://example.com/\n",
    " http://example.com/",
    "http://example.com/" + "a" * 3000,  # longer than the verdicts kept
    "http://exa mple.com/" + "a" * 3000,
]
HEADERS = [
    {},
    {"X-Custom": "1"},
    {"Authorization": "Bearer t"},
    {"Bad Name": "1"},
    {"Host": "evil"},
    {"X-Webhook-Attempt": "9"},
    {"X-Ok": "a\r\nInjected: 1"},
    {"X-Ok": 1},
    {"X-Ok": None},
]


def webhook_bodies() -> list[dict[str, Any]]:
    """Webhook envelopes of every kind: good, bad and odd URLs, headers and shapes."""
    bodies: list[dict[str, Any]] = []
    for url in [*URLS, *VALUES]:
        for headers in [*HEADERS, *VALUES]:
            bodies.append({"url": url, "headers": headers})
        bodies.append({"url": url})
        bodies.append({"url": url, "extra": 1})
    bodies += [{}, {"headers": {}}, *VALUES]
    return [
        {"function": "hello", "contract": 1, "mode": mode, "webhook": webhook}
        for webhook in bodies
        for mode in ("webhook", "sync")
    ]


def test_plain_envelope_agrees_with_the_schema_on_webhooks() -> None:
    checked = 0
    for body in webhook_bodies():
        plain = plain_envelope(body)
        if plain is not None:
            assert plain == schema_load(ENVELOPE, body), body
            checked += 1
    assert checked > 50


def test_plain_envelope_agrees_with_the_schema_without_a_webhook() -> None:
    body = {"function": "hello", "contract": 1, "mode": "webhook"}
    assert plain_envelope(body) is None  # the schema says which field is missing
    for value in VALUES:
        body = {"function": "hello", "contract": 1, "mode": "webhook", "webhook": value}
        assert plain_envelope(body) is None


@pytest.mark.parametrize(
    "webhook",
    [
        {"url": "http://127.0.0.1:9/hook"},
        {"url": "https://receiver.example.com/hook?token=t", "headers": {"X-Custom": "1"}},
        {"url": "http://receiver.internal:8080/hook", "headers": {"Authorization": "Bearer t"}},
    ],
)
def test_common_webhook_envelopes_take_the_shortcut(webhook: dict[str, Any]) -> None:
    body = {"function": "f", "contract": 1, "mode": "webhook", "webhook": webhook}
    plain = plain_envelope(body)
    assert plain is not None and plain == ENVELOPE.load(body)


# --- validate_task -------------------------------------------------------------------------------


def test_a_valid_body_becomes_a_task_spec() -> None:
    body = {"function": "hello", "input": {"name": "Andera"}, "contract": 1, "priority": 7}
    spec = validate(body)
    assert spec.function is REGISTRY.functions["hello"]
    assert spec.params == {"name": "Andera"}
    assert (spec.priority, spec.mode, spec.webhook) == (7, "sync", None)


def test_defaults_of_the_envelope_and_of_the_params() -> None:
    spec = validate({"function": "hello", "contract": 1})
    assert spec.params == {"name": "World"}
    assert (spec.priority, spec.mode, spec.webhook) == (1, "sync", None)


def test_a_webhook_task_carries_its_target() -> None:
    hook = {"url": "http://receiver.internal:8080/hook", "headers": {"X-Custom": "1"}}
    spec = validate({"function": "hello", "contract": 1, "mode": "webhook", "webhook": hook})
    assert spec.mode == "webhook"
    assert spec.webhook == WebhookTarget(hook["url"], {"X-Custom": "1"})
    no_headers = validate(
        {"function": "hello", "contract": 1, "mode": "webhook", "webhook": {"url": hook["url"]}}
    )
    assert no_headers.webhook == WebhookTarget(hook["url"], {})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"contract": 1}, "function"),
        ({"function": "", "contract": 1}, "function"),
        ({"function": "hello"}, "contract"),
        ({"function": "hello", "contract": True}, "contract"),
        ({"function": "hello", "contract": 1, "priority": 0}, "priority"),
        ({"function": "hello", "contract": 1, "priority": MAX_PRIORITY + 1}, "priority"),
        ({"function": "hello", "contract": 1, "mode": "carrier-pigeon"}, "mode"),
        ({"function": "hello", "contract": 1, "input": [1]}, "input"),
        ({"function": "hello", "contract": 1, "mode": "webhook"}, "webhook"),
    ],
)
def test_an_invalid_envelope_is_a_400_naming_the_field(body: dict[str, Any], field: str) -> None:
    refused = refusal(body)
    assert isinstance(refused, BadRequest)
    assert refused.message == "Invalid task request"
    assert refused.details is not None and set(refused.details) == {field}


def test_checks_come_in_order_envelope_contract_group_function_stream_input() -> None:
    # Each body fails every check from its own onwards; the first failing check answers.
    everything_wrong = {
        "function": "nope",
        "contract": 2,
        "group": "gpu",
        "mode": "stream",
        "input": {"x": 1},
    }
    envelope = refusal({**everything_wrong, "priority": 0})
    assert envelope.message == "Invalid task request"
    contract = refusal(everything_wrong)
    assert contract.message == "Contract version mismatch: requested 2, worker is 1"
    group = refusal({**everything_wrong, "contract": 1})
    assert group.message == "Group mismatch: requested 'gpu', worker is 'default'"
    function = refusal({**everything_wrong, "contract": 1, "group": GROUP})
    assert (type(function), function.status) == (NotFound, 404)
    assert function.message == "Function 'nope' not found"
    stream = refusal({**everything_wrong, "contract": 1, "group": GROUP, "function": "typed"})
    assert stream.message == "Function 'typed' does not support streaming"
    params = refusal(
        {**everything_wrong, "contract": 1, "group": GROUP, "function": "typed", "mode": "sync"}
    )
    assert params.message == "Invalid input for function 'typed'"
    for refused in (envelope, contract, group, stream, params):
        assert (type(refused), refused.status) == (BadRequest, 400)


@pytest.mark.parametrize("url", ["http://example.com:99999/hook", "http://example.com:65536/"])
def test_a_webhook_url_with_a_port_out_of_range_is_a_400(url: str) -> None:
    # It used to pass the schema's URL check, then raise ValueError (a 500) parsing it.
    body = {"function": "hello", "contract": 1, "mode": "webhook", "webhook": {"url": url}}
    refused = refusal(body)
    assert isinstance(refused, BadRequest)
    assert refused.details == {"webhook": {"url": ["Not a valid URL."]}}
    assert plain_envelope(body) is None


def test_a_matching_group_and_a_streaming_function_pass() -> None:
    spec = validate({"function": "hello", "contract": 1, "group": GROUP, "mode": "stream"})
    assert (spec.function.name, spec.mode) == ("hello", "stream")


def test_input_errors_name_every_failing_param() -> None:
    bad = {"text": "A", "count": 11, "flag": "yes", "extra": 1}
    refused = refusal({"function": "typed", "contract": 1, "input": bad})
    assert refused.message == "Invalid input for function 'typed'"
    assert refused.details is not None
    assert set(refused.details) == {"text", "count", "flag", "extra"}
    assert refused.details["extra"] == ["Unknown field."]
    assert len(refused.details["text"]) == 2  # too short and not lowercase letters
    missing = refusal({"function": "typed", "contract": 1, "input": {}})
    assert missing.details == {"text": ["Missing data for required field."]}


# --- task ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("offered", ["lb-1", "a" * 128, "A.b_c:d-9", "0"])
def test_a_sane_balancer_task_id_is_adopted(offered: str) -> None:
    spec = validate({"function": "hello", "contract": 1, "_taskId": offered})
    assert spec.task_id == offered


@pytest.mark.parametrize(
    "offered",
    ["", "a" * 129, "has space", "slash/in/it", "new\nline", "é", 42, None, ["lb-1"]],
)
def test_any_other_balancer_task_id_is_replaced_by_a_new_one(offered: Any) -> None:
    spec = validate({"function": "hello", "contract": 1, "_taskId": offered})
    assert spec.task_id != offered
    assert uuid.UUID(spec.task_id).version == 4


def test_without_a_balancer_task_id_each_task_gets_a_new_one() -> None:
    ids = {validate({"function": "hello", "contract": 1}).task_id for _ in range(20)}
    assert len(ids) == 20


def test_task_ids_are_version_4_uuids() -> None:
    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000
    for text in list(ids)[:50]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_a_forked_child_takes_no_id_its_parent_takes() -> None:
    new_task_id()  # the parent now holds a batch of ids
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, new_task_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read, "rb") as pipe:
        childs = pipe.read().decode()
    assert uuid.UUID(childs).version == 4
    assert childs != new_task_id()


@given(st.binary(min_size=16, max_size=16 * 40))
def test_task_ids_are_written_as_the_uuid_module_writes_them(random: bytes) -> None:
    expected = [
        str(uuid.UUID(bytes=random[i : i + 16], version=4)) for i in range(0, len(random) - 15, 16)
    ]
    assert task_ids(random) == expected
