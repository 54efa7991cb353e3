"""Mode sync: the task's result is the answer to its request."""

from __future__ import annotations

from aiohttp import web

from worker.jsoncodec import NotJSON, dumps_answer
from worker.outcomes import Outcome, verdict
from worker.responses import RETRY_AFTER, json_body, json_response
from worker.server import on_hang_up
from worker.tasks import Dispatcher, TaskResult, TaskSpec


def result_response(result: TaskResult) -> web.Response:
    """The answer for a finished task (also a stream's answer when it failed silently)."""
    headers = {"X-Task-Id": result.task_id}
    if result.outcome is Outcome.SUCCEEDED:
        try:
            raw = dumps_answer({"success": True, "result": result.value})
        except NotJSON as exc:
            return json_response({"success": False, "error": str(exc)}, 500, headers)
        return json_body(raw, 200, headers)
    status = verdict(result.outcome, result.reason).status
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER
    return json_response({"success": False, "error": result.error}, status, headers)


class SyncMode:
    """Runs the task in its request's own task and answers with its result once it has ended;
    a client that leaves while its task is queued takes it out of the queue."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def __call__(self, request: web.Request, spec: TaskSpec) -> web.StreamResponse:
        result = await self._dispatcher.run_here(spec, lambda abandon: on_hang_up(request, abandon))
        return result_response(result)
