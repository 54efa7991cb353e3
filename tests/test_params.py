"""The Andera params vocabulary, compiled to marshmallow: what passes, what fails, and how."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from marshmallow import ValidationError

from tests.conftest import JSON_VALUES
from worker.params import ParamsError, compile_params, validate_input


def errors(params: dict[str, Any], data: Any) -> dict[str, Any]:
    with pytest.raises(ValidationError) as caught:
        validate_input(compile_params("f", params), data)
    messages = caught.value.messages
    assert isinstance(messages, dict)
    return messages


def load(params: dict[str, Any], data: Any) -> dict[str, Any]:
    return validate_input(compile_params("f", params), data)


@pytest.mark.parametrize(
    ("spec", "good", "bad"),
    [
        ({"type": "string"}, ["", "text"], [1, True, None, [], {}]),
        ({"type": "number"}, [0, 3, -2.5, 1e300], ["1", True, False, None, []]),
        ({"type": "boolean"}, [True, False], [1, 0, "true", "yes", None]),
        ({"type": "object"}, [{}, {"a": [1], "b": None}], [[], "x", 1, None]),
        ({"type": "array"}, [[], [1, "a", None]], [{}, "abc", 1, None]),
    ],
)
def test_types_accept_json_of_their_kind_only(
    spec: dict[str, Any], good: list[Any], bad: list[Any]
) -> None:
    for value in good:
        assert load({"v": spec}, {"v": value}) == {"v": value}
    for value in bad:
        assert list(errors({"v": spec}, {"v": value})) == ["v"], value


def test_numbers_keep_their_json_form() -> None:
    loaded = load({"a": {"type": "number"}, "b": {"type": "number"}}, {"a": 3, "b": 2.5})
    assert loaded == {"a": 3, "b": 2.5}
    assert type(loaded["a"]) is int and type(loaded["b"]) is float


def test_min_and_max_bound_numbers_by_value() -> None:
    spec = {"n": {"type": "number", "min": 1, "max": 10}}
    assert load(spec, {"n": 1}) == {"n": 1} and load(spec, {"n": 10}) == {"n": 10}
    assert "n" in errors(spec, {"n": 0.5}) and "n" in errors(spec, {"n": 11})


def test_min_and_max_bound_strings_and_arrays_by_length() -> None:
    text = {"s": {"type": "string", "min": 2, "max": 3}}
    assert load(text, {"s": "ab"}) == {"s": "ab"}
    assert "s" in errors(text, {"s": "a"}) and "s" in errors(text, {"s": "abcd"})
    items = {"a": {"type": "array", "min": 1, "max": 2}}
    assert load(items, {"a": [1, 2]}) == {"a": [1, 2]}
    assert "a" in errors(items, {"a": []}) and "a" in errors(items, {"a": [1, 2, 3]})


def test_enum_and_pattern() -> None:
    spec = {
        "colour": {"type": "string", "enum": ["red", "green"]},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
    }
    assert load(spec, {"colour": "red", "code": "ABC"}) == {"colour": "red", "code": "ABC"}
    assert set(errors(spec, {"colour": "blue", "code": "abc"})) == {"colour", "code"}


def test_required_default_and_absent() -> None:
    spec = {
        "need": {"type": "string", "required": True},
        "opt": {"type": "number"},
        "dflt": {"type": "string", "default": "x"},
    }
    assert load(spec, {"need": "y"}) == {"need": "y", "dflt": "x"}
    assert errors(spec, {}) == {"need": ["Missing data for required field."]}


def test_a_default_makes_a_param_optional_even_if_marked_required() -> None:
    spec = {"name": {"type": "string", "required": True, "default": "World"}}
    assert load(spec, {}) == {"name": "World"}


def test_unknown_input_keys_are_rejected_by_name() -> None:
    assert errors({"a": {"type": "string"}}, {"a": "x", "b": 1}) == {"b": ["Unknown field."]}
    assert list(errors({}, {"anything": 1})) == ["anything"]


def test_input_must_be_an_object() -> None:
    assert list(errors({}, [1])) == ["input"]


def test_every_failing_param_is_reported_at_once() -> None:
    spec = {"a": {"type": "number"}, "b": {"type": "boolean"}, "c": {"type": "string"}}
    assert set(errors(spec, {"a": "1", "b": "1", "c": 1})) == {"a", "b", "c"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "str"}, "type must be one of"),
        ({}, "type must be one of"),
        ({"type": "string", "minLength": 1}, "unknown key(s) minLength"),
        ({"type": "string", "description": "x"}, "unknown key(s) description"),
    ],
)
def test_bad_declarations_are_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compile_params("f", {"p": spec})


def test_pattern_matches_anywhere_like_javascript_regexp_test() -> None:
    schema = compile_params("f", {"word": {"type": "string", "pattern": "b+"}})
    assert schema.load({"word": "abba"}) == {"word": "abba"}
    with pytest.raises(ValidationError) as caught:
        schema.load({"word": "xyz"})
    assert caught.value.messages == {"word": ["String does not match expected pattern."]}


# --- the shortcut for plainly valid input agrees with the schema ---------------------------------

VALUES = JSON_VALUES  # every kind of JSON value, and the edges of the ranges

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


def schema_load(schema: Any, data: Any) -> Any:
    try:
        return schema.load(data)
    except ValidationError as exc:
        return ("error", exc.messages)


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
