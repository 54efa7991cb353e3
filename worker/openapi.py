"""GET /openapi and GET /docs: the OpenAPI 3 document and Swagger UI served from local assets.

The document is built once, on its first request, through aiohttp-apispec from the marshmallow
schemas that validate POST /task (the envelope and each registered function's input schema).
Only aiohttp-apispec's documentation side is used: requests are validated by our own code, never
by its middleware. Every endpoint is described in `OPERATIONS` below; a new endpoint is added
there too (a test checks that every route is documented).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, get_args

from aiohttp import web
from marshmallow import Schema, fields

from worker import __version__
from worker.envelope import MODES, TaskEnvelopeSchema
from worker.functions import Registry
from worker.logtail import MAX_LINES
from worker.params import Number, StrictBoolean
from worker.slots import Status

DOCUMENT_PATH = "/openapi"
UI_PATH = "/docs"
UI_ASSETS = "/docs/static"

_JSON = "application/json"
STATUSES = list(get_args(Status))
# A field's messages or, for a nested field (webhook.url, an item of an array param), the same
# shape one level down, as marshmallow reports it.
DETAILS_VALUE = {
    "anyOf": [
        {"type": "array", "items": {"type": "string"}},
        {"type": "object", "additionalProperties": True},
    ]
}
_NAME = re.compile(r"[^A-Za-z0-9._-]")


class ErrorSchema(Schema):
    """Every error answer."""

    success = fields.Boolean(required=True, metadata={"example": False})
    error = fields.String(required=True, metadata={"description": "One readable sentence."})
    details = fields.Dict(
        keys=fields.String(),
        values=fields.Raw(),  # DETAILS_VALUE in the document
        metadata={"description": "Field (or input param) name -> messages, where fields fail."},
    )


class ResultSchema(Schema):
    """A sync task's answer."""

    success = fields.Boolean(required=True, metadata={"example": True})
    result = fields.Raw(required=True, metadata={"description": "What the function returned."})


class AcceptedSchema(Schema):
    """A webhook task's answer, as soon as it is accepted."""

    success = fields.Boolean(required=True, metadata={"example": True})
    task_id = fields.String(required=True)
    message = fields.String(required=True)
    duplicate = fields.Boolean(
        metadata={"description": "True when an earlier task had this Idempotency-Key."}
    )


class DeadLetterSchema(Schema):
    task_id = fields.String(required=True)
    function = fields.String(required=True)
    target = fields.String(required=True, metadata={"description": "No query or userinfo."})
    error = fields.String(allow_none=True)
    attempts = fields.Integer(required=True)
    failed_at = fields.String(allow_none=True, metadata={"description": "ISO 8601, UTC."})


class DeadLettersSchema(Schema):
    """GET /deadletters."""

    count = fields.Integer(required=True)
    deadletters = fields.List(fields.Nested(DeadLetterSchema), required=True)


class RedeliveringSchema(Schema):
    redelivering = fields.Integer(required=True)


class PurgedSchema(Schema):
    purged = fields.Integer(required=True)


class DeliverySchema(Schema):
    """The body POSTed to `webhook.url` when the task ends."""

    task_id = fields.String(required=True)
    function = fields.String(required=True)
    success = fields.Boolean(required=True)
    result = fields.Raw(metadata={"description": "When success is true."})
    error = fields.String(metadata={"description": "When success is false."})


class SlotsSchema(Schema):
    used = fields.Integer(required=True)
    available = fields.Integer(required=True, metadata={"description": "0 while not ready."})
    limit = fields.Integer(required=True)
    queue = fields.Integer(required=True)


class HealthSchema(Schema):
    """GET /health: `status` for anyone, the rest with either key."""

    status = fields.String(required=True, metadata={"enum": STATUSES})
    group = fields.String()
    contract = fields.Integer()
    websocketPort = fields.Integer()  # the Andera load balancer's field name
    functions = fields.List(fields.Dict(), metadata={"description": '[{"name", "params"}]'})
    services = fields.List(
        fields.Dict(),
        metadata={"description": '[{"name", "state": up | down | restarting, "status"}]'},
    )
    tags = fields.Dict()
    slots = fields.Nested(SlotsSchema)
    system = fields.Dict(metadata={"description": "uptime, cpuLoad, usedMemoryPercent"})
    version = fields.String()
    loadBalancer = fields.Dict()  # the Andera load balancer's field name
    webhooks = fields.Dict(metadata={"description": "pending, delivered, failed"})
    http = fields.Dict(
        metadata={
            "description": "the listener: connections, maxConnections, headerTimeouts, "
            "evicted (closed without a request head to make room), refused"
        }
    )


class ReadySchema(Schema):
    """GET /ready."""

    status = fields.String(required=True, metadata={"enum": STATUSES})


class LogsSchema(Schema):
    logs = fields.List(fields.String(), required=True, metadata={"description": "Oldest first."})


class StatusSchema(Schema):
    """POST /on and /off."""

    status = fields.String(required=True, metadata={"enum": ["ready", "maintenance"]})
    message = fields.String(required=True)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Any, description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}, **extra}


def _error(description: str, **headers: str) -> dict[str, Any]:
    answer = _json(ErrorSchema, description)
    if headers:
        answer["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return answer


_TASK_ID = {"X-Task-Id": {"description": "The task's id.", "schema": {"type": "string"}}}
_UNAUTHORIZED = _error("Missing or wrong credentials.", **{"WWW-Authenticate": "Bearer"})
_OPERATOR: list[dict[str, list[str]]] = [{"authKey": []}, {"authKey": [], "lbAuthKey": []}]
_EITHER_KEY: list[dict[str, list[str]]] = [{"authKey": []}, {"lbAuthKey": []}]


def _task_operation(inputs: dict[str, str]) -> dict[str, Any]:
    variants = [
        {
            "title": function,
            "allOf": [
                _ref("TaskEnvelope"),
                {
                    "type": "object",
                    "properties": {
                        "function": {"type": "string", "enum": [function]},
                        "input": _ref(component),
                    },
                },
            ],
        }
        for function, component in inputs.items()
    ]
    first = next(iter(inputs), "hello")
    return {
        "summary": "Run a function",
        "description": (
            "Validates the envelope and the function's input before the task takes a queue "
            "place. Modes: `sync` answers with the result; `stream` answers with the output as "
            "it is produced (chunked `text/plain`, or server-sent events with "
            "`Accept: text/event-stream`); `webhook` answers 202 at once and POSTs the result "
            "to `webhook.url` (see Callbacks). Each function's input schema is one of the "
            "request body variants and a component named `<function>Input`."
        ),
        "security": _OPERATOR,
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": (
                    "Mode webhook: a second task with the same key while the first is retained "
                    "runs nothing and answers 202 with the first task_id and duplicate: true."
                ),
                "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                _JSON: {
                    "schema": {"oneOf": variants} if variants else _ref("TaskEnvelope"),
                    "example": {"function": first, "input": {}, "contract": 1, "mode": "sync"},
                }
            },
        },
        "responses": {
            "200": {
                "description": "sync: the result. stream: the output, chunk by chunk.",
                "headers": _TASK_ID,
                "content": {
                    _JSON: {"schema": ResultSchema},
                    "text/plain": {"schema": {"type": "string"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            "202": _json(AcceptedSchema, "webhook: accepted.", headers=_TASK_ID),
            "400": _error("Invalid body, envelope, contract, group, mode or input."),
            "401": _UNAUTHORIZED,
            "404": _error("Unknown function."),
            "413": _error("Body over http.max_body_size."),
            "500": _error("The function raised."),
            "503": _error("Maintenance, draining or queue full.", **{"Retry-After": "Seconds."}),
            "504": _error("The function ran over its timeout."),
        },
        "callbacks": {
            "result": {
                "{$request.body#/webhook/url}": {
                    "post": {
                        "description": (
                            "Mode webhook: the result, with X-Task-Id, User-Agent, the "
                            "configured and requested headers, and X-Signature-256 "
                            "(sha256=<hex HMAC of the body>) when webhook.secret is set. "
                            "Retried on connection errors, timeouts, 408, 429 and 5xx."
                        ),
                        "requestBody": {
                            "required": True,
                            "content": {_JSON: {"schema": _ref("Delivery")}},
                        },
                        "responses": {"200": {"description": "Any 2xx: delivered."}},
                    }
                }
            }
        },
    }


def _dead_letter_action(answer: type[Schema], status: str, summary: str) -> dict[str, Any]:
    selection = {
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "task_ids": {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1, "maxLength": 128},
                        "minItems": 1,
                        "maxItems": 10000,
                    }
                },
                "required": ["task_ids"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"all": {"type": "boolean", "enum": [True]}},
                "required": ["all"],
                "additionalProperties": False,
            },
        ]
    }
    return {
        "summary": summary,
        "security": _OPERATOR,
        "requestBody": {"required": True, "content": {_JSON: {"schema": selection}}},
        "responses": {
            status: _json(answer, summary + "."),
            "400": _error("Neither task_ids nor all: true."),
            "401": _UNAUTHORIZED,
        },
    }


def _toggle(message: str) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": _json(StatusSchema, message),
        "401": _UNAUTHORIZED,
        "409": _error("Draining for shutdown: nothing changed."),
    }
    return {"summary": message, "security": _OPERATOR, "responses": responses}


def operations(inputs: dict[str, str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Path -> method -> OpenAPI operation, for every endpoint."""
    return {
        "/task": {"post": _task_operation(inputs)},
        "/health": {
            "get": {
                "summary": "Worker status",
                "description": "Anyone gets `status`; either key (in either header) the rest.",
                "security": [{}, *_EITHER_KEY],
                "responses": {"200": _json(HealthSchema, "Always 200.")},
            }
        },
        "/ready": {
            "get": {
                "summary": "May this worker be sent tasks? (for plain load balancers)",
                "description": (
                    "No key, no body parsing. 200 while new tasks are taken; 503 with the "
                    "reason (maintenance, draining, starting, degraded) otherwise."
                ),
                "security": [],
                "responses": {
                    "200": _json(ReadySchema, "Ready: send tasks."),
                    "503": {
                        **_json(ReadySchema, "Not ready: send tasks elsewhere."),
                        "headers": {
                            "Retry-After": {"description": "Seconds.", "schema": {"type": "string"}}
                        },
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "description": (
                    "The text exposition format (OpenMetrics when the scraper asks for it): "
                    "tasks, durations, queue wait, slots, status, webhook deliveries, load "
                    "balancer links, services, HTTP requests, process and Python figures."
                ),
                "security": [{"authKey": []}, {"lbAuthKey": []}],
                "responses": {
                    "200": {
                        "description": "The metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/logs": {
            "get": {
                "summary": "Recent log lines, or follow new ones",
                "security": _EITHER_KEY,
                "parameters": [
                    {
                        "name": "lines",
                        "in": "query",
                        "description": "Only the last N lines.",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_LINES},
                    },
                    {
                        "name": "follow",
                        "in": "query",
                        "description": "1: stream every new line as text/plain until you leave.",
                        "schema": {"type": "string", "enum": ["0", "1"]},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The lines, oldest first (follow: one line per line).",
                        "content": {
                            _JSON: {"schema": LogsSchema},
                            "text/plain": {"schema": {"type": "string"}},
                        },
                    },
                    "400": _error("Bad lines or follow."),
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/deadletters": {
            "get": {
                "summary": "Webhook results whose delivery failed for good",
                "security": _OPERATOR,
                "responses": {
                    "200": _json(DeadLettersSchema, "The dead letters."),
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/deadletters/redeliver": {
            "post": _dead_letter_action(RedeliveringSchema, "202", "Deliver again")
        },
        "/deadletters/purge": {"post": _dead_letter_action(PurgedSchema, "200", "Forget them")},
        "/off": {"post": _toggle("Maintenance mode enabled")},
        "/on": {"post": _toggle("Maintenance mode disabled")},
        DOCUMENT_PATH: {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3 JSON."}},
            }
        },
        UI_PATH: {
            "get": {
                "summary": "Swagger UI for this document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "HTML page; its assets are served locally.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


def input_components(registry: Registry) -> dict[str, str]:
    """Function name -> the name of its input schema's component (`<name>Input`)."""
    names: dict[str, str] = {}
    for function in registry.functions:
        base = _NAME.sub("_", function) + "Input"
        name, index = base, 2
        while name in names.values():
            name, index = f"{base}{index}", index + 1
        names[function] = name
    return names


def build_document(registry: Registry) -> dict[str, Any]:
    """The OpenAPI document for this worker's endpoints and functions.

    aiohttp-apispec and the apispec 3 it needs are imported here, on the first request for the
    document, not at startup: they pull in setuptools (about 11 MiB and 0.1 s) for a page most
    workers never serve. They also predate current setuptools and marshmallow and warn about it
    at import and at every use; the warnings are theirs, not ours.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from aiohttp_apispec import AiohttpApiSpec
        from apispec import APISpec

        plugin = AiohttpApiSpec(url=DOCUMENT_PATH, title="base-worker", version=__version__).plugin
        spec = APISpec(
            title="base-worker",
            version=__version__,
            openapi_version="3.0.2",
            plugins=(plugin,),
            info={
                "description": (
                    "Runs registered functions over HTTP in prioritised parallel slots. "
                    f"Modes: {', '.join(MODES)}."
                )
            },
        )
        # Our custom fields are plain JSON numbers and booleans.
        plugin.map_to_openapi_type("number", None)(Number)
        plugin.map_to_openapi_type("boolean", None)(StrictBoolean)
        spec.components.security_scheme(
            "authKey",
            {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "AUTH_KEY (a `Bearer ` prefix is accepted).",
            },
        )
        spec.components.security_scheme(
            "lbAuthKey",
            {
                "type": "apiKey",
                "in": "header",
                "name": "x-lb-auth",
                "description": "LB_AUTH_KEY (a `Bearer ` prefix is accepted).",
            },
        )
        spec.components.schema("TaskEnvelope", schema=TaskEnvelopeSchema)
        spec.components.schema("Delivery", schema=DeliverySchema)  # apispec skips callbacks
        inputs = input_components(registry)
        for function, component in inputs.items():
            # Unknown input keys are rejected.
            closed = {"additionalProperties": False}
            spec.components.schema(component, closed, schema=registry.functions[function].schema)
        for path, operation in operations(inputs).items():
            spec.path(path=path, operations=operation)
        document: dict[str, Any] = spec.to_dict()
    details = document["components"]["schemas"]["Error"]["properties"]["details"]
    details["additionalProperties"] = DETAILS_VALUE
    return document


def _assets() -> Path:
    """Swagger UI's files, shipped in the aiohttp-apispec package (found without importing it)."""
    found = importlib.util.find_spec("aiohttp_apispec")
    if found is None or found.origin is None:
        raise RuntimeError("aiohttp-apispec is not installed")
    return Path(found.origin).parent / "static"


def add_routes(
    add: Callable[[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]], object],
    registry: Registry,
) -> None:
    """Serve the document at /openapi and Swagger UI (local assets) at /docs, through `add`
    (method, path, handler): the API's own route table."""
    assets = _assets()
    files = {path.name: path for path in assets.iterdir() if path.is_file()}
    index_page = (
        (assets / "index.html")
        .read_text(encoding="utf-8")
        .replace("{{ static }}", UI_ASSETS)
        .replace("{{ path }}", DOCUMENT_PATH)
    )
    built: list[bytes] = []
    building = asyncio.Lock()

    async def document(request: web.Request) -> web.Response:
        async with building:
            if not built:
                # Imports and builds once; in a thread so the event loop never waits on it.
                spec = await asyncio.to_thread(build_document, registry)
                built.append(json.dumps(spec).encode())
        return web.Response(body=built[0], content_type="application/json")

    async def ui(request: web.Request) -> web.Response:
        return web.Response(text=index_page, content_type="text/html")

    async def asset(request: web.Request) -> web.StreamResponse:
        found = files.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        return web.FileResponse(found)

    add("GET", DOCUMENT_PATH, document)
    add("GET", UI_PATH, ui)
    add("GET", UI_ASSETS + "/{name}", asset)
