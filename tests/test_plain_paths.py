"""The hand-checked shortcuts for plainly valid requests agree with the marshmallow schemas.

Whenever a shortcut answers, the schema must give the same answer; whatever the shortcut leaves
to the schema is worded by the schema as before. The common requests must take the shortcut.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest
from marshmallow import ValidationError

from worker.envelope import ENVELOPE, new_task_id, plain_envelope
from worker.params import compile_params, validate_input

VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    3,
    -3,
    2.5,
    2097152,
    2097153,
    "",
    "hello",
    [],
    [1],
    {},
]
VALUES += [{"name": "Andera"}, [None], [1, None], "stream", "sync", "webhook", "x" * 40]


def schema_load(schema: Any, data: Any) -> Any:
    try:
        return schema.load(data)
    except ValidationError as exc:
        return ("error", exc.messages)


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


def test_webhook_envelopes_take_the_schema() -> None:
    body = {"function": "f", "contract": 1, "mode": "webhook", "webhook": {"url": "http://x/"}}
    assert plain_envelope(body) is None


PARAMS: dict[str, dict[str, Any]] = {
    "s": {"type": "string", "min": 1, "max": 5},
    "e": {"type": "string", "enum": ["a", "b"]},
    "p": {"type": "string", "pattern": "^x+$"},
    "n": {"type": "number", "min": 0, "max": 10},
    "b": {"type": "boolean"},
    "o": {"type": "object", "max": 1},
    "a": {"type": "array", "min": 1},
    "r": {"type": "string", "required": True},
    "d": {"type": "string", "default": "World"},
    "z": {"type": "number", "default": None},
}


def test_plain_input_agrees_with_the_schema() -> None:
    schema = compile_params("t", PARAMS)
    samples: list[Any] = [*VALUES, "a", "b", "xx", 10, 11, {"k": 1}, {"k": 1, "j": 2}]
    checked = 0
    for name, value in itertools.product(PARAMS, samples):
        data = {"r": "here", name: value}
        plain = schema.plain(data)
        if plain is not None:
            assert plain == schema_load(schema, data), data
            checked += 1
    for data in ({}, {"r": "x", "unknown": 1}, {"r": None}):
        assert schema.plain(data) is None
    assert checked > 30


def test_common_input_takes_the_shortcut() -> None:
    schema = compile_params("hello", {"name": {"type": "string", "default": "World"}})
    assert schema.plain({"name": "Andera"}) == {"name": "Andera"}
    assert schema.plain({}) == {"name": "World"}
    assert validate_input(schema, {}) == {"name": "World"}
    with pytest.raises(ValidationError) as refused:
        validate_input(schema, {"name": 3})
    assert refused.value.messages == {"name": ["Not a valid string."]}


def test_task_ids_are_version_4_uuids() -> None:
    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000
    for text in list(ids)[:50]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
