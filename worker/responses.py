"""JSON answers, and mode sync: the answer for a task once it has ended."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from worker.jsoncodec import NotJSON, dumps_result
from worker.outcomes import Outcome, verdict
from worker.tasks import Dispatcher, TaskResult, TaskSpec

# How a mode answers an accepted task's request: sync, stream or webhook.
Answer = Callable[[web.Request, TaskSpec], Awaitable[web.StreamResponse]]
RETRY_AFTER = "5"  # seconds, on every 503


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
            text = dumps_result({"success": True, "result": result.value})
        except NotJSON as exc:
            return json_response({"success": False, "error": str(exc)}, 500, headers)
        return web.Response(text=text, headers=headers, content_type="application/json")
    status = verdict(result.outcome, result.reason).status
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER
    return json_response({"success": False, "error": result.error}, status, headers)


class SyncMode:
    """Mode sync: the task's result is the answer to its request."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def __call__(self, request: web.Request, spec: TaskSpec) -> web.StreamResponse:
        job = self._dispatcher.submit(spec)
        return result_response(await job.result())
