"""Who may call what, over real HTTP, and the header rules underneath."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import AUTH_KEY, LB_KEY, task
from worker import auth
from worker.config import AuthSection

Start = Callable[..., Any]
KEYS = AuthSection(auth_key=AUTH_KEY, lb_auth_key=LB_KEY)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": ""}, 401),
        ({"Authorization": "wrong"}, 401),
        ({"Authorization": AUTH_KEY + "x"}, 401),
        ({"Authorization": AUTH_KEY[:-1]}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Basic " + AUTH_KEY}, 401),
        ({"Authorization": LB_KEY}, 401),  # the balancer's key is not the operator's
        ({"x-lb-auth": LB_KEY}, 401),
        ({"Authorization": AUTH_KEY}, 200),
        ({"Authorization": "Bearer " + AUTH_KEY}, 200),
        ({"Authorization": "bearer " + AUTH_KEY}, 200),
        ({"Authorization": AUTH_KEY, "x-lb-auth": "wrong"}, 401),
        ({"Authorization": AUTH_KEY, "x-lb-auth": ""}, 401),
        ({"Authorization": AUTH_KEY, "x-lb-auth": AUTH_KEY}, 401),
        ({"Authorization": AUTH_KEY, "x-lb-auth": LB_KEY}, 200),
        ({"Authorization": AUTH_KEY, "X-LB-Auth": LB_KEY}, 200),
        ({"Authorization": AUTH_KEY, "x-lb-auth": "Bearer " + LB_KEY}, 200),
    ],
)
async def test_task_auth_matrix(worker_app: Start, headers: dict[str, str], status: int) -> None:
    client, runtime = await worker_app()
    response = await client.post("/task", json=task("hello"), headers=headers)
    assert response.status == status, await response.text()
    body = await response.json()
    if status == 401:
        assert body["success"] is False and body["error"]
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert AUTH_KEY not in await response.text()
        assert runtime.dispatcher.counts.total() == 0  # nothing ran
    else:
        assert body["success"] is True


async def test_x_lb_auth_is_never_accepted_without_an_lb_key(worker_app: Start) -> None:
    client, _ = await worker_app(auth={"lb_auth_key": ""})
    for value in ("", "anything", LB_KEY):
        headers = {"Authorization": AUTH_KEY, "x-lb-auth": value}
        response = await client.post("/task", json=task("hello"), headers=headers)
        assert response.status == 401, value
    response = await client.post("/task", json=task("hello"), headers={"Authorization": AUTH_KEY})
    assert response.status == 200


async def test_401_comes_before_maintenance_and_body_checks(worker_app: Start) -> None:
    client, _ = await worker_app()
    assert (await client.post("/off", headers={"Authorization": AUTH_KEY})).status == 200
    response = await client.post("/task", data=b"not json", headers={"Authorization": "wrong"})
    assert response.status == 401


@pytest.mark.parametrize("path", ["/on", "/off"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "wrong"}, 401),
        ({"Authorization": LB_KEY}, 401),
        ({"x-lb-auth": LB_KEY}, 401),
        ({"x-lb-auth": AUTH_KEY}, 401),
        ({"Authorization": AUTH_KEY, "x-lb-auth": "wrong"}, 401),
        ({"Authorization": AUTH_KEY}, 200),
        ({"Authorization": "Bearer " + AUTH_KEY}, 200),
        ({"Authorization": AUTH_KEY, "x-lb-auth": LB_KEY}, 200),
    ],
)
async def test_on_off_need_the_auth_key(
    worker_app: Start, path: str, headers: dict[str, str], status: int
) -> None:
    client, runtime = await worker_app()
    if path == "/on":
        runtime.set_maintenance(True)
    before = runtime.slots.status
    response = await client.post(path, headers=headers)
    assert response.status == status
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert runtime.slots.status == before  # refused callers change nothing
    else:
        assert runtime.slots.status == ("ready" if path == "/on" else "maintenance")


@pytest.mark.parametrize(
    ("headers", "detailed"),
    [
        ({}, False),
        ({"Authorization": "wrong"}, False),
        ({"x-lb-auth": "wrong"}, False),
        ({"Authorization": "Bearer wrong"}, False),
        ({"Authorization": AUTH_KEY}, True),
        ({"Authorization": "Bearer " + AUTH_KEY}, True),
        ({"Authorization": LB_KEY}, True),
        ({"x-lb-auth": LB_KEY}, True),
        ({"x-lb-auth": AUTH_KEY}, True),
        ({"x-lb-auth": "Bearer " + LB_KEY}, True),
        ({"Authorization": "wrong", "x-lb-auth": LB_KEY}, True),
    ],
)
async def test_health_public_or_detailed(
    worker_app: Start, headers: dict[str, str], detailed: bool
) -> None:
    client, _ = await worker_app()
    response = await client.get("/health", headers=headers)
    assert response.status == 200  # always, whatever the credentials
    body = await response.json()
    if detailed:
        assert body["status"] == "ready" and "slots" in body and "functions" in body
    else:
        assert body == {"status": "ready"}


def test_matches_rules() -> None:
    assert auth.matches(AUTH_KEY, AUTH_KEY)
    assert auth.matches(f"Bearer {AUTH_KEY}", AUTH_KEY)
    assert auth.matches(f"BEARER  {AUTH_KEY} ", AUTH_KEY)
    assert not auth.matches(None, AUTH_KEY)
    assert not auth.matches("", "")  # an empty configured key never matches
    assert not auth.matches("anything", "")
    assert not auth.matches("Bearer", AUTH_KEY)
    assert not auth.matches("ключ", AUTH_KEY)  # non-ASCII offered values are refused, not errors


def test_sees_details_with_either_key_in_either_header() -> None:
    for header in ("Authorization", "x-lb-auth"):
        for key in (AUTH_KEY, LB_KEY):
            assert auth.sees_details({header: key}, KEYS)
        assert not auth.sees_details({header: "nope"}, KEYS)


async def raw_request(port: int, request_line: bytes, header: bytes) -> bytes:
    """Send bytes no HTTP client library would: a header value that is not UTF-8."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        request_line + b" HTTP/1.1\r\nHost: worker\r\n" + header + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


@pytest.mark.parametrize(
    ("request_line", "header", "status"),
    [
        (b"POST /task", b"Authorization: \xff\xfe\xc3", b"401"),
        (b"POST /task", b"Authorization: " + AUTH_KEY.encode() + b"\r\nx-lb-auth: \xff", b"401"),
        (b"POST /off", b"Authorization: \xff", b"401"),
        (b"GET /health", b"Authorization: \xff\xfe", b"200"),
        (b"GET /health", b"x-lb-auth: \xc3\x28", b"200"),
    ],
)
async def test_credentials_that_are_not_utf8_are_refused_not_a_500(
    worker_app: Start, request_line: bytes, header: bytes, status: bytes
) -> None:
    client, _ = await worker_app()
    answer = await raw_request(client.port, request_line, header)
    assert answer.split(b" ", 2)[1] == status, answer
