"""Errors that carry their HTTP answer; one middleware turns any of them into the JSON body."""

from __future__ import annotations

from typing import Any, ClassVar


class WorkerError(Exception):
    """Root of every error base-worker answers with; `status` is the HTTP status."""

    status: ClassVar[int] = 500
    headers: ClassVar[dict[str, str]] = {}
    closes_connection: ClassVar[bool] = False  # the answer ends the client's connection

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"success": False, "error": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(WorkerError):
    """The request is malformed or fails validation."""

    status = 400


class Unauthorized(WorkerError):
    """Missing or wrong credentials."""

    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class NotFound(WorkerError):
    """No such function or endpoint."""

    status = 404


class Conflict(WorkerError):
    """The request contradicts the worker's state (e.g. /on while draining)."""

    status = 409


class RequestTimeout(WorkerError):
    """The body did not arrive within `http.body_timeout`; the connection is closed."""

    status = 408
    closes_connection = True


class PayloadTooLarge(WorkerError):
    """The body is over `http.max_body_size`."""

    status = 413


class Unavailable(WorkerError):
    """The worker cannot take the task now: maintenance, draining or a full queue."""

    status = 503
    headers = {"Retry-After": "5"}


class ConfigError(Exception):
    """A configuration problem; the message is one line naming the key."""
