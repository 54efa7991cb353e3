"""Mode sync (worker/sync.py): the answer for an ended task; status and body follow the verdict
table, and every answer names its task."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.outcomes import Outcome, Reason, verdict
from worker.responses import RETRY_AFTER
from worker.sync import result_response
from worker.tasks import TaskResult


def body_of(response: Any) -> Any:
    return json.loads(response.text)


def test_a_success_is_200_with_the_result() -> None:
    response = result_response(TaskResult("t-1", Outcome.SUCCEEDED, {"n": [1, 2.5]}))
    assert (response.status, response.content_type) == (200, "application/json")
    assert response.headers["X-Task-Id"] == "t-1"
    assert body_of(response) == {"success": True, "result": {"n": [1, 2.5]}}


@pytest.mark.parametrize("value", [float("nan"), object(), {1, 2}], ids=["NaN", "object", "set"])
def test_a_result_json_cannot_hold_is_a_500_naming_the_cause(value: Any) -> None:
    response = result_response(TaskResult("t-2", Outcome.SUCCEEDED, value))
    assert response.status == 500
    assert response.headers["X-Task-Id"] == "t-2"
    body = body_of(response)
    assert body["success"] is False
    assert body["error"].startswith("Function result is not JSON-serialisable")


@pytest.mark.parametrize(
    ("outcome", "reason", "error"),
    [
        (Outcome.FAILED, None, "went wrong"),
        (Outcome.TIMED_OUT, Reason.TIMEOUT, "Function timed out after 0.2s"),
        (Outcome.CANCELLED, Reason.SHUTDOWN, Reason.SHUTDOWN.value),
        (Outcome.CANCELLED, Reason.CLIENT_GONE_QUEUED, Reason.CLIENT_GONE_QUEUED.value),
        (Outcome.CANCELLED, Reason.CLIENT_GONE_STREAMING, Reason.CLIENT_GONE_STREAMING.value),
    ],
)
def test_an_unsuccessful_task_answers_the_status_of_its_verdict(
    outcome: Outcome, reason: Reason | None, error: str
) -> None:
    response = result_response(TaskResult("t-3", outcome, error=error, reason=reason))
    assert response.status == verdict(outcome, reason).status
    assert response.headers["X-Task-Id"] == "t-3"
    assert body_of(response) == {"success": False, "error": error}
    # Only a 503 tells the client when to come back.
    assert ("Retry-After" in response.headers) is (response.status == 503)
    if response.status == 503:
        assert response.headers["Retry-After"] == RETRY_AFTER
