"""Errors that carry their HTTP answer (worker/errors.py): one root, a status and headers per
subclass, and the JSON body the middleware sends."""

from __future__ import annotations

import pytest

from worker.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    WorkerError,
)


@pytest.mark.parametrize(
    ("error", "status", "headers"),
    [
        (WorkerError, 500, {}),
        (BadRequest, 400, {}),
        (Unauthorized, 401, {"WWW-Authenticate": "Bearer"}),
        (NotFound, 404, {}),
        (Conflict, 409, {}),
        (RequestTimeout, 408, {}),
        (PayloadTooLarge, 413, {}),
        (Unavailable, 503, {"Retry-After": "5"}),
    ],
)
def test_each_error_knows_its_status_and_headers(
    error: type[WorkerError], status: int, headers: dict[str, str]
) -> None:
    raised = error("it went wrong")
    assert isinstance(raised, WorkerError)
    assert (raised.status, raised.headers) == (status, headers)
    assert (raised.message, str(raised)) == ("it went wrong", "it went wrong")


def test_the_body_is_the_error_and_its_details_when_there_are_any() -> None:
    assert BadRequest("nope").body() == {"success": False, "error": "nope"}
    assert BadRequest("nope", {}).body() == {"success": False, "error": "nope"}
    details = {"input": ["Not a valid mapping type."]}
    assert BadRequest("Invalid task request", details).body() == {
        "success": False,
        "error": "Invalid task request",
        "details": details,
    }


def test_only_a_body_timeout_closes_the_connection() -> None:
    """The middleware closes the connection after answering an error that says so."""
    assert RequestTimeout.closes_connection
    assert not any(
        e.closes_connection
        for e in (WorkerError, BadRequest, Unauthorized, NotFound, Conflict, PayloadTooLarge)
    )
    assert not Unavailable.closes_connection
