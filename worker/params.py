"""The Andera params vocabulary, compiled once per function into a marshmallow schema."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, cast

from marshmallow import RAISE, Schema, ValidationError, fields, missing, validate

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


class Pattern(validate.Regexp):
    """`pattern` as JavaScript's RegExp.test reads it (Andera): a match anywhere in the string."""

    def __call__(self, value: Any) -> Any:
        if cast("re.Pattern[str]", self.regex).search(value) is None:
            raise ValidationError(self._format_error(value))
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
        checks.append(Pattern(re.compile(spec["pattern"])))
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


class InputSchema(Schema):
    """A function's input schema, with a shortcut for input that is plainly valid."""

    plain: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None


# What each param type accepts without a second look: exact JSON types; a null param never.
_PLAIN_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def _plain_loader(
    built: Mapping[str, fields.Field], params: Mapping[str, Mapping[str, Any]]
) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """What `schema.load` gives for input it accepts, or None to let the schema decide.

    Runs the same validators as the schema's fields; a wrong type, a null, a missing required
    param, an unknown key or a failed check returns None, and marshmallow words the error.
    """
    plan = [
        (name, _PLAIN_TYPES[spec["type"]], field.validators, field.load_default, field.required)
        for (name, spec), field in zip(params.items(), built.values(), strict=True)
    ]
    names = frozenset(built)

    def load(data: dict[str, Any]) -> dict[str, Any] | None:
        if not names.issuperset(data):
            return None
        loaded: dict[str, Any] = {}
        for name, types, validators, default, required in plan:
            if name in data:
                value = data[name]
                if type(value) not in types:
                    return None
                if types[0] is dict:
                    value = dict(value)
                elif types[0] is list:
                    value = list(value)
                for check in validators:
                    try:
                        check(value)
                    except ValidationError:
                        return None
                loaded[name] = value
            elif default is not missing:
                loaded[name] = default() if callable(default) else default
            elif required:
                return None
        return loaded

    return load


def compile_params(function_name: str, params: Mapping[str, Mapping[str, Any]]) -> Schema:
    """Build the input schema for one function; unknown input keys are rejected."""
    built = {name: _field(name, spec) for name, spec in params.items()}
    schema_class = InputSchema.from_dict(built, name=f"{function_name}Input")
    schema = cast(InputSchema, schema_class(unknown=RAISE))
    schema.plain = _plain_loader(built, params)
    return schema


def validate_input(schema: Schema, data: Any) -> dict[str, Any]:
    """Load input through its schema; raises marshmallow.ValidationError with per-param messages."""
    if not isinstance(data, dict):
        raise ValidationError({"input": ["Must be an object."]})
    plain = getattr(schema, "plain", None)
    if plain is not None:
        fast: dict[str, Any] | None = plain(data)
        if fast is not None:
            return fast
    loaded: dict[str, Any] = schema.load(data)
    return loaded
