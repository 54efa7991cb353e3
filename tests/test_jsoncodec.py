"""The JSON codec parses like the standard library, with or without orjson installed."""

from __future__ import annotations

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
