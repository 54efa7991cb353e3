"""Validating a `POST /task` body into a TaskSpec, before it may take a queue place or a slot."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any

from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    validate,
    validates,
    validates_schema,
)
from yarl import URL

from worker import jsoncodec
from worker.errors import BadRequest, NotFound
from worker.functions import Registry
from worker.params import StrictBoolean, validate_input
from worker.targets import TargetPolicy, header_problems
from worker.tasks import TaskSpec, WebhookTarget

MAX_PRIORITY = 2097152
MAX_CONTRACT = 2**31 - 1
MODES = ("sync", "stream", "webhook")
_BALANCER_TASK_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class WebhookSchema(Schema):
    """Where to deliver the result in mode webhook."""

    class Meta:
        unknown = EXCLUDE

    url = fields.Url(required=True, schemes={"http", "https"}, require_tld=False)
    headers = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)

    @validates("headers")
    def _headers_are_safe(self, headers: dict[str, str], **kwargs: Any) -> None:
        problems = header_problems(headers)
        if problems:
            raise ValidationError(problems)

    @validates_schema
    def _one_source_of_credentials(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "url" not in data:
            return
        problem = credentials_problem(data["url"], data.get("headers", {}))
        if problem is not None:
            raise ValidationError([problem[1]], problem[0])


def credentials_problem(url: str, headers: dict[str, str]) -> tuple[str, str] | None:
    """(field, message) when a URL the schema's URL check passed still cannot be used: yarl,
    which aiohttp sends with, refuses it (a port past 65535), or it carries credentials and
    the headers an Authorization too (aiohttp turns user:password@ into one and refuses a
    second)."""
    try:
        parsed = URL(url)
    except ValueError:
        return "url", "Not a valid URL."
    if parsed.raw_user is not None and any(name.lower() == "authorization" for name in headers):
        return "headers", "Header 'Authorization' may not be set with credentials in the URL."
    return None


class TaskEnvelopeSchema(Schema):
    """The body of POST /task; keys a load balancer adds (such as `_taskId`) are ignored."""

    class Meta:
        unknown = EXCLUDE

    function = fields.String(required=True, validate=validate.Length(min=1))
    input = fields.Dict(load_default=dict)
    contract = fields.Integer(required=True, strict=True, validate=validate.Range(1, MAX_CONTRACT))
    priority = fields.Integer(strict=True, load_default=1, validate=validate.Range(1, MAX_PRIORITY))
    mode = fields.String(load_default="sync", validate=validate.OneOf(MODES))
    webhook = fields.Nested(WebhookSchema)
    group = fields.String()

    @validates_schema
    def _webhook_for_mode(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("mode") == "webhook" and "webhook" not in data:
            raise ValidationError("Required in mode webhook.", "webhook")


class DeadLetterSelectionSchema(Schema):
    """The body of POST /deadletters/redeliver and /purge: some task ids, or all."""

    class Meta:
        unknown = RAISE

    task_ids = fields.List(
        fields.String(validate=validate.Length(1, 128)), validate=validate.Length(1, 10000)
    )
    all = StrictBoolean()

    @validates_schema
    def _one_of(self, data: dict[str, Any], **kwargs: Any) -> None:
        if ("task_ids" in data) == (data.get("all") is True):
            raise ValidationError('Give either "task_ids" or "all": true.', "_schema")


def dead_letter_selection(body: dict[str, Any]) -> list[str] | None:
    """The task ids a dead-letter action names, or None for all; a 400 otherwise."""
    try:
        chosen = DeadLetterSelectionSchema().load(body)
    except ValidationError as exc:
        raise BadRequest("Invalid dead letter selection", details=_details(exc)) from None
    task_ids: list[str] | None = chosen.get("task_ids")
    return task_ids


ENVELOPE = TaskEnvelopeSchema()
_NO_INPUT: Any = object()
# The schema's own URL check, so that the shortcut judges a webhook URL exactly as it does.
_CHECK_URL = WebhookSchema._declared_fields["url"].validators[0]
# A receiver's URL comes back task after task; its verdict is kept for URLs this long at most.
KEPT_URL_LENGTH = 2048


def _url_is_valid(url: str) -> bool:
    try:
        _CHECK_URL(url)
    except ValidationError:
        return False
    return True


# The schema's URL regex was 3.6 % of a webhook accept's samples (py-spy).
_kept_url_verdict = functools.lru_cache(maxsize=1024)(_url_is_valid)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what it is instead."""
    try:
        body = jsoncodec.loads(raw)
    except ValueError:  # also JSONDecodeError, UnicodeDecodeError, and NaN or Infinity
        raise BadRequest("Request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("Request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    return body


def plain_webhook(webhook: Any) -> dict[str, Any] | None:
    """What WebhookSchema gives for a plainly valid `{"url", "headers"}`, or None."""
    if type(webhook) is not dict:
        return None
    url = webhook.get("url")
    headers = webhook.get("headers", _NO_INPUT)
    if type(url) is not str:
        return None
    if headers is _NO_INPUT:
        headers = {}
    elif type(headers) is not dict or any(
        type(name) is not str or type(value) is not str for name, value in headers.items()
    ):
        return None
    if not (_kept_url_verdict if len(url) <= KEPT_URL_LENGTH else _url_is_valid)(url):
        return None
    if (headers and header_problems(headers)) or credentials_problem(url, headers) is not None:
        return None
    return {"url": url, "headers": dict(headers)}


def plain_envelope(body: dict[str, Any]) -> dict[str, Any] | None:
    """What ENVELOPE.load gives for a plainly valid request, or None.

    Most requests are `{"function", "input", "contract"}`, perhaps with a mode and a webhook
    `{"url", "headers"}`, and nothing odd; checking those by hand is several times cheaper
    than marshmallow. Anything else (a wrong type, a value out of range, a bad URL or header)
    returns None and takes the full schema, which words the errors.
    """
    function = body.get("function")
    contract = body.get("contract")
    params = body.get("input", _NO_INPUT)
    priority = body.get("priority", 1)
    mode = body.get("mode", "sync")
    if (
        type(function) is not str
        or not function
        or type(contract) is not int
        or not 1 <= contract <= MAX_CONTRACT
        or type(priority) is not int
        or not 1 <= priority <= MAX_PRIORITY
        or (mode != "sync" and mode != "stream" and mode != "webhook")
    ):
        return None
    webhook = None
    if "webhook" in body:
        webhook = plain_webhook(body["webhook"])
        if webhook is None:
            return None
    elif mode == "webhook":
        return None
    if params is _NO_INPUT:
        params = {}
    elif type(params) is not dict:
        return None
    envelope = {
        "function": function,
        "input": params,
        "contract": contract,
        "priority": priority,
        "mode": mode,
    }
    if webhook is not None:
        envelope["webhook"] = webhook
    if "group" in body:
        if type(body["group"]) is not str:
            return None
        envelope["group"] = body["group"]
    return envelope


def validate_task(
    body: dict[str, Any],
    registry: Registry,
    group: str,
    contract: int,
    targets: Callable[[], TargetPolicy] | None = None,
) -> TaskSpec:
    """Check the envelope, the webhook target against the policy `targets` gives (asked only
    for a webhook task), the contract, the group, the function and its input, in that order."""
    envelope = plain_envelope(body)
    if envelope is None:
        try:
            envelope = ENVELOPE.load(body)
        except ValidationError as exc:
            raise BadRequest("Invalid task request", details=_details(exc)) from None
    if "webhook" in envelope and targets is not None:
        refusal = targets().refusal_of_url(envelope["webhook"]["url"])
        if refusal is not None:
            details = {"webhook": {"url": [f"Target refused: {refusal}."]}}
            raise BadRequest("Invalid task request", details=details)
    if envelope["contract"] != contract:
        raise BadRequest(
            f"Contract version mismatch: requested {envelope['contract']}, worker is {contract}"
        )
    if "group" in envelope and envelope["group"] != group:
        raise BadRequest(f"Group mismatch: requested {envelope['group']!r}, worker is {group!r}")
    spec = registry.get(envelope["function"])
    if spec is None:
        raise NotFound(f"Function '{envelope['function']}' not found")
    if envelope["mode"] == "stream" and not spec.streaming:
        raise BadRequest(f"Function '{spec.name}' does not support streaming")
    try:
        params = validate_input(spec.schema, envelope["input"])
    except ValidationError as exc:
        raise BadRequest(f"Invalid input for function '{spec.name}'", _details(exc)) from None
    webhook = envelope.get("webhook")
    # Positional: a NamedTuple made with keywords costs twice as much (some 3,000 instructions).
    return TaskSpec(
        _task_id(body),
        spec,
        params,
        envelope["priority"],
        envelope["mode"],
        WebhookTarget(webhook["url"], webhook["headers"]) if webhook else None,
    )


def _task_id(body: dict[str, Any]) -> str:
    """The Andera balancer's `_taskId` when it sends a sane one, so logs correlate; else new."""
    offered = body.get("_taskId")
    if isinstance(offered, str) and _BALANCER_TASK_ID.match(offered):
        return offered
    return new_task_id()


# Task ids are made IDS_PER_BATCH at a time: one os.urandom call (a system call) for all of
# them, and their text written a digit position at a time. One id's own slices and f-string
# cost some 8,000 instructions, where taking one made in a batch costs about 2,500.
IDS_PER_BATCH = 256
_ID_LENGTH = 36  # 8-4-4-4-12 hex digits
# Where each of a UUID's 32 hex digits stands in its text: after the dashes before it.
_DIGIT_AT = tuple(d + (d >= 8) + (d >= 12) + (d >= 16) + (d >= 20) for d in range(32))
# Version 4's variant digit keeps two random bits: 8, 9, a or b.
_VARIANT_DIGIT = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")
_TASK_IDS: list[str] = []
os.register_at_fork(after_in_child=_TASK_IDS.clear)  # a forked child never repeats its parent's


def task_ids(random: bytes) -> list[str]:
    """Random (version 4) UUIDs as `str(uuid.UUID(bytes=..., version=4))` writes them, one for
    each 16 bytes of `random`."""
    count = len(random) // 16
    digits = random[: count * 16].hex().encode()
    step = _ID_LENGTH + 1  # and a space between ids
    text = bytearray(b"-" * (step * count))
    for digit, at in enumerate(_DIGIT_AT):
        text[at::step] = digits[digit::32]
    text[14::step] = b"4" * count  # the version
    text[19::step] = digits[16::32].translate(_VARIANT_DIGIT)
    text[_ID_LENGTH::step] = b" " * count
    return text.decode().split()


def new_task_id() -> str:
    """A random (version 4) UUID as text, as str(uuid.uuid4()) writes it."""
    if not _TASK_IDS:
        _TASK_IDS.extend(task_ids(os.urandom(16 * IDS_PER_BATCH)))
    return _TASK_IDS.pop()


def _details(exc: ValidationError) -> dict[str, Any]:
    messages = exc.messages
    return messages if isinstance(messages, dict) else {"_schema": messages}
