"""JSON answers (worker/responses.py), as every route and mode writes them."""

from __future__ import annotations

import json

from worker.responses import json_response


def test_json_response_carries_status_headers_and_body() -> None:
    response = json_response({"a": "é"}, 409, {"X-Extra": "1"})
    assert (response.status, response.content_type) == (409, "application/json")
    assert response.headers["X-Extra"] == "1"
    assert json.loads(response.text) == {"a": "é"}


def test_json_response_defaults_to_200_without_extra_headers() -> None:
    response = json_response([1, None])
    assert (response.status, json.loads(response.text)) == (200, [1, None])
    assert "Retry-After" not in response.headers
