"""JSON in and out: orjson when it is installed (the `fast` extra), else the standard library.

Both paths accept and produce the same values: orjson is tried first and anything it refuses
(integers beyond 64 bits, NaN literals, types the standard library would refuse too) goes
through `json`, so the answer, or the error, is the one the standard library gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - depends on the installed extras
    orjson = None  # type: ignore[assignment,unused-ignore]

DecodeError = json.JSONDecodeError

if orjson is not None:
    _OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
    _OPTIONS |= orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS

    def dumps(value: Any) -> str:
        """`value` as compact JSON text; TypeError or ValueError when it is not JSON."""
        try:
            text: str = orjson.dumps(value, option=_OPTIONS).decode()
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            return json.dumps(value)
        return text

    def loads(raw: bytes | str) -> Any:
        """Parse JSON text; json.JSONDecodeError or UnicodeDecodeError when it is not."""
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json.loads(raw)

    def dumps_log(value: Any, default: Callable[[Any], Any] | None = None, **_: Any) -> str:
        """The log renderer's serializer (structlog passes `default=` for odd values)."""
        try:
            text: str = orjson.dumps(
                value, default=default, option=orjson.OPT_NON_STR_KEYS
            ).decode()
        except TypeError:
            return json.dumps(value, default=default)
        return text

    ENGINE = "orjson"
else:  # pragma: no cover - depends on the installed extras

    def dumps(value: Any) -> str:
        """`value` as JSON text; TypeError or ValueError when it is not JSON."""
        return json.dumps(value)

    def loads(raw: bytes | str) -> Any:
        """Parse JSON text; json.JSONDecodeError or UnicodeDecodeError when it is not."""
        return json.loads(raw)

    def dumps_log(value: Any, default: Callable[[Any], Any] | None = None, **_: Any) -> str:
        """The log renderer's serializer (structlog passes `default=` for odd values)."""
        return json.dumps(value, default=default)

    ENGINE = "json"
