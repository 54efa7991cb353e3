"""JSON answers, as every route and mode writes them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from worker.jsoncodec import dumps_answer

RETRY_AFTER = "5"  # seconds, on every 503
JSON_TYPE = "application/json; charset=utf-8"


def json_body(raw: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """An answer whose compact JSON is already written (`jsoncodec.dumps_answer`). `headers`
    is the caller's own dict, made for this answer: the content type is added to it."""
    if headers is None:
        headers = {"Content-Type": JSON_TYPE}
    else:
        headers["Content-Type"] = JSON_TYPE
    return web.Response(body=raw, status=status, headers=headers)


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """`body` as compact JSON."""
    return json_body(dumps_answer(body), status, headers)
