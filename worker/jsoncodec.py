"""Request bodies in, log lines out: orjson when it is installed (the `fast` extra).

`loads` accepts and refuses exactly what the standard library does: orjson is tried first,
and anything it refuses (integers beyond 64 bits, deep nesting, UTF-16) goes through `json`,
so the value, or the error, is the standard library's. NaN and Infinity are refused on both
paths: they are not JSON. Log lines and answers (`dumps_answer`) are compact JSON, written by
orjson when it is installed, which refuses what the standard library would refuse; a stream's
JSON chunks keep the standard library's text (`dumps_result`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - depends on the installed extras
    orjson = None  # type: ignore[assignment,unused-ignore]

DecodeError = json.JSONDecodeError


class NotJSON(ValueError):
    """A function's result that JSON cannot hold; the message names the cause."""


def dumps_result(body: Any) -> str:
    """A stream chunk holding a function's result, as the standard library's JSON text; NotJSON
    when it has values JSON cannot hold (NaN, Infinity, other types) or is nested too deeply."""
    try:
        return json.dumps(body, allow_nan=False)
    except Exception as exc:  # also a type JSON cannot hold, or an object that fails when read
        raise _not_json_result(exc) from None


def _dumps_compact(body: Any) -> bytes:
    """The standard library's compact JSON: what orjson writes for the same value, save the
    spelling of some floats (1e16 against 1e+16)."""
    try:
        text = json.dumps(body, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except Exception as exc:
        raise _not_json_result(exc) from None
    return text.encode()


LOOKED_THROUGH = 256  # values; a bigger answer holding a null goes to the standard library


def _non_finite_in(value: Any) -> bool | None:
    """Whether `value` holds a NaN or an infinite float; None when it holds more than
    LOOKED_THROUGH values (cheaper for the standard library's encoder to judge)."""
    stack, budget = [value], LOOKED_THROUGH
    while stack:
        budget -= 1
        if budget < 0:
            return None
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def _not_json_result(exc: Exception) -> NotJSON:
    """The one sentence every mode gives for a result JSON cannot hold."""
    if isinstance(exc, RecursionError):
        cause = "nested too deeply"
    elif isinstance(exc, ValueError) and str(exc).startswith("Out of range float"):
        cause = "it holds a NaN or infinite number, which JSON cannot represent"
    else:
        cause = str(exc)
    return NotJSON(f"Function result is not JSON-serialisable: {cause}")


def _not_json(constant: str) -> Any:
    """Python's parser accepts NaN and Infinity; JSON has no such numbers (and NaN slips past
    every min/max check)."""
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    """A JSON number that overflows a double (1e400) would become infinity, not a number."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is too large for a number")
    return value


if orjson is not None:
    # Types the standard library refuses (dataclasses, datetimes) and subclasses of str, int,
    # dict and list go to it, so the set of results answered does not depend on the extras.
    _ANSWER_OPTIONS = (
        orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_DATETIME
        | orjson.OPT_PASSTHROUGH_SUBCLASS
    )

    def dumps_answer(body: Any, floatless: bool = False) -> bytes:
        """An answer as compact JSON (UTF-8); NotJSON when it holds values JSON cannot (NaN,
        Infinity, other types) or is nested too deeply. `floatless`: the caller knows `body`
        holds no float at all, so a null written is a None (a task's None result)."""
        try:
            raw: bytes = orjson.dumps(body, option=_ANSWER_OPTIONS)
        except TypeError:  # also orjson.JSONEncodeError: big integers, other types, depth
            return _dumps_compact(body)
        # orjson writes NaN and Infinity as null: a null that may be one of them is judged by
        # the standard library (a result of None, the usual webhook no-op, is looked at here).
        # (find, not `in`: on bytes, `in` first tries the operand as an integer, and raises
        # and clears a TypeError for every answer.)
        if not floatless and raw.find(b"null") >= 0 and _non_finite_in(body) is not False:
            return _dumps_compact(body)
        return raw

    def loads(raw: bytes | str) -> Any:
        """Parse JSON text; ValueError (JSONDecodeError, UnicodeDecodeError) when it is not,
        RecursionError when it is nested too deeply."""
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json.loads(raw, parse_constant=_not_json, parse_float=_finite)

    def dumps_log(value: Any, default: Callable[[Any], Any] | None = None, **_: Any) -> str:
        """The log renderer's serializer (structlog passes `default=` for odd values). orjson's
        option for keys that are not strings costs every line a third more; it is taken only
        for a line that has such a key."""
        try:
            return orjson.dumps(value, default=default).decode()
        except TypeError:
            pass  # a key that is not a string (or a value no option would write)
        try:
            return orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            return json.dumps(value, default=default)

    ENGINE = "orjson"
else:  # pragma: no cover - depends on the installed extras

    def dumps_answer(body: Any, floatless: bool = False) -> bytes:
        """An answer as compact JSON (UTF-8); NotJSON when it holds values JSON cannot (NaN,
        Infinity, other types) or is nested too deeply."""
        return _dumps_compact(body)

    def loads(raw: bytes | str) -> Any:
        """Parse JSON text; ValueError (JSONDecodeError, UnicodeDecodeError) when it is not."""
        return json.loads(raw, parse_constant=_not_json, parse_float=_finite)

    def dumps_log(value: Any, default: Callable[[Any], Any] | None = None, **_: Any) -> str:
        """The log renderer's serializer (structlog passes `default=` for odd values)."""
        return json.dumps(value, default=default)

    ENGINE = "json"


def dumps_success(value: Any, **head: Any) -> bytes:
    """A finished task's answer or delivery body: `head`, then `"success": true` and the result
    (`dumps_answer`). A None result holds no float, so its null needs no look for a NaN."""
    return dumps_answer({**head, "success": True, "result": value}, floatless=value is None)
