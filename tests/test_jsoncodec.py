"""The JSON codec gives the standard library's answers, with or without orjson installed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker import jsoncodec


@pytest.mark.parametrize(
    "value",
    [
        {"success": True, "result": {"message": "Hello Andera!"}},
        {"nested": [1, 2.5, None, "é", {"k": False}]},
        {"big": 2**70, "negative": -(2**65)},
        {1: "int key"},
        [],
        "text",
    ],
)
def test_dumps_round_trips_like_the_standard_library(value: Any) -> None:
    assert json.loads(jsoncodec.dumps(value)) == json.loads(json.dumps(value))


@pytest.mark.parametrize(
    "value", [{1, 2}, object(), {"when": __import__("datetime").date(2024, 1, 1)}]
)
def test_dumps_refuses_what_the_standard_library_refuses(value: Any) -> None:
    with pytest.raises(TypeError):
        jsoncodec.dumps(value)


@pytest.mark.parametrize(
    "raw", [b'{"a": 1}', b'{"big": 1180591620717411303424}', '{"a": "\u00e9"}'.encode("utf-16")]
)
def test_loads_accepts_what_the_standard_library_accepts(raw: bytes) -> None:
    assert jsoncodec.loads(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe\xfa", b""])
def test_loads_refuses_what_the_standard_library_refuses(raw: bytes) -> None:
    with pytest.raises((jsoncodec.DecodeError, UnicodeDecodeError)):
        jsoncodec.loads(raw)


def test_log_serializer_uses_the_fallback_handler() -> None:
    assert json.loads(jsoncodec.dumps_log({"x": {1, 2}}, default=repr)) == {"x": "{1, 2}"}
