"""The Andera params vocabulary, compiled once per function into a marshmallow schema."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate

PARAM_TYPES = ("string", "number", "boolean", "object", "array")
PARAM_KEYS = frozenset({"type", "required", "default", "enum", "pattern", "min", "max"})


class Number(fields.Field):
    """A JSON number, kept as given (3 stays 3, 2.5 stays 2.5); booleans and strings refused."""

    default_error_messages = {"invalid": "Not a valid number."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.make_error("invalid")
        return value


class StrictBoolean(fields.Field):
    """A JSON true or false, nothing that merely looks like one."""

    default_error_messages = {"invalid": "Not a valid boolean."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class ParamsError(ValueError):
    """A function declared params the vocabulary does not allow."""


def _field(name: str, spec: Mapping[str, Any]) -> fields.Field:
    unknown = set(spec) - PARAM_KEYS
    if unknown:
        raise ParamsError(f"param {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ParamsError(f"param {name!r}: type must be one of {', '.join(PARAM_TYPES)}")
    low, high = spec.get("min"), spec.get("max")
    checks: list[Any] = []
    if low is not None or high is not None:
        checks.append(validate.Range(low, high) if kind == "number" else validate.Length(low, high))
    if "enum" in spec:
        checks.append(validate.OneOf(list(spec["enum"])))
    if "pattern" in spec:
        checks.append(validate.Regexp(re.compile(spec["pattern"])))
    options: dict[str, Any] = {"required": bool(spec.get("required", False)), "validate": checks}
    if "default" in spec:
        options["load_default"] = spec["default"]
        options["required"] = False
    if kind == "string":
        return fields.String(**options)
    if kind == "number":
        return Number(**options)
    if kind == "boolean":
        return StrictBoolean(**options)
    if kind == "object":
        return fields.Dict(**options)
    return fields.List(fields.Raw(allow_none=True), **options)  # JSON arrays may hold null


def compile_params(function_name: str, params: Mapping[str, Mapping[str, Any]]) -> Schema:
    """Build the input schema for one function; unknown input keys are rejected."""
    built = {name: _field(name, spec) for name, spec in params.items()}
    schema_class = Schema.from_dict(built, name=f"{function_name}Input")
    return schema_class(unknown=RAISE)


def validate_input(schema: Schema, data: Any) -> dict[str, Any]:
    """Load input through its schema; raises marshmallow.ValidationError with per-param messages."""
    if not isinstance(data, dict):
        raise ValidationError({"input": ["Must be an object."]})
    loaded: dict[str, Any] = schema.load(data)
    return loaded
