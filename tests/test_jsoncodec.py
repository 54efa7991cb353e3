"""The JSON codec parses like the standard library, with or without orjson installed."""

from __future__ import annotations

import datetime
import json

import pytest

from worker import jsoncodec


@pytest.mark.parametrize(
    "raw", [b'{"a": 1}', b'{"big": 1180591620717411303424}', '{"a": "\u00e9"}'.encode("utf-16")]
)
def test_loads_accepts_what_the_standard_library_accepts(raw: bytes) -> None:
    assert jsoncodec.loads(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe\xfa", b"", b'{"a": NaN}', b"[-Infinity]"])
def test_loads_refuses_what_is_not_json(raw: bytes) -> None:
    with pytest.raises(ValueError):
        jsoncodec.loads(raw)


def test_loads_says_when_it_is_nested_too_deeply() -> None:
    with pytest.raises(RecursionError):
        jsoncodec.loads(b"[" * 100_000 + b"]" * 100_000)


def test_log_serializer_uses_the_fallback_handler() -> None:
    assert json.loads(jsoncodec.dumps_log({"x": {1, 2}}, default=repr)) == {"x": "{1, 2}"}


@pytest.mark.parametrize(
    "value",
    [{1: "int key", "s": {2.5: [None]}}, {"ok": 1, None: True}, {"set": {1, 2}, 3: "both"}],
)
def test_log_lines_with_keys_that_are_not_strings_are_written_as_json_writes_them(
    value: dict[object, object],
) -> None:
    # With orjson: its compact text, the keys written as strings; without: the json module's.
    separators = (",", ":") if jsoncodec.ENGINE == "orjson" else None
    expected = json.dumps(value, default=repr, separators=separators)
    assert jsoncodec.dumps_log(value, default=repr) == expected


@pytest.mark.parametrize(
    "value",
    [{"a": [1, 2.5, "é", None, True]}, {"big": 2**70}, {1: "int key"}, "x" * 3, [[[]]] * 300],
)
def test_answers_are_the_standard_librarys_compact_json(value: object) -> None:
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert jsoncodec.dumps_answer(value).decode() == expected


@pytest.mark.parametrize(
    "value",
    [float("nan"), [float("inf")], {"a": object()}, {1, 2}, datetime.date(2026, 1, 1)],
    ids=["NaN", "Infinity", "object", "set", "date"],
)
def test_answers_refuse_what_the_standard_library_refuses(value: object) -> None:
    with pytest.raises(jsoncodec.NotJSON):
        jsoncodec.dumps_answer(value)


@pytest.mark.parametrize(
    "value",
    [
        {"result": None, "x": float("nan")},
        {"result": None, "deep": [[{"x": (1, float("-inf"))}]]},
        [None] * 1000 + [float("inf")],  # more than the codec looks through itself
    ],
    ids=["beside", "nested", "big"],
)
def test_a_non_finite_number_beside_a_null_is_refused(value: object) -> None:
    """orjson writes NaN and Infinity as null, as it writes None."""
    with pytest.raises(jsoncodec.NotJSON):
        jsoncodec.dumps_answer(value)


@pytest.mark.parametrize("value", [None, {"result": None}, [None] * 1000, {"a": [None, 1.5]}])
def test_nulls_are_answered(value: object) -> None:
    expected = json.dumps(value, separators=(",", ":"))
    assert jsoncodec.dumps_answer(value).decode() == expected


@pytest.mark.parametrize(
    "value",
    [{"success": True, "result": None}, {"task_id": "t", "result": None}, [None, "x", 1, True]],
)
def test_a_floatless_answer_is_written_alike_without_the_look_for_a_nan(value: object) -> None:
    """A task's None result (sync answers, webhook bodies) skips the look through the answer:
    holding no float, its null can only be a None."""
    expected = json.dumps(value, separators=(",", ":"))
    assert jsoncodec.dumps_answer(value, floatless=True).decode() == expected
    assert jsoncodec.dumps_answer(value, floatless=True) == jsoncodec.dumps_answer(value)


def test_answers_refuse_nesting_too_deep_for_the_standard_library() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(jsoncodec.NotJSON):
        jsoncodec.dumps_answer(deep)
