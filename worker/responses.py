"""JSON answers, as every route and mode writes them."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

RETRY_AFTER = "5"  # seconds, on every 503


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json.dumps(body), status=status, headers=headers, content_type="application/json"
    )
