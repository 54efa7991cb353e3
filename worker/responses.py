"""JSON answers shared by the HTTP handlers and the response modes."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from worker.runner import Outcome
from worker.tasks import TaskResult

OUTCOME_STATUS = {Outcome.FAILED: 500, Outcome.TIMED_OUT: 504, Outcome.CANCELLED: 503}


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def result_response(result: TaskResult) -> web.Response:
    """The sync answer for a finished task (also a stream's answer when it failed silently)."""
    headers = {"X-Task-Id": result.task_id}
    if result.outcome is Outcome.SUCCEEDED:
        try:
            text = json.dumps({"success": True, "result": result.value}, allow_nan=False)
        except (TypeError, ValueError) as exc:
            body = {"success": False, "error": f"Function result is not JSON-serialisable: {exc}"}
            return json_response(body, 500, headers)
        return web.Response(text=text, headers=headers, content_type="application/json")
    if result.outcome is Outcome.CANCELLED:
        headers["Retry-After"] = "5"
    return json_response(
        {"success": False, "error": result.error}, OUTCOME_STATUS[result.outcome], headers
    )
