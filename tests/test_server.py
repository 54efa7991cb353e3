"""The HTTP listener's edge, against a real daemon over raw loopback sockets: idle, slow-header and
slow-body connections are closed after their timeouts, requests that arrive normally are served,
and a flood of idle connections cannot stop `/health` from answering."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import AUTH_KEY
from tests.daemon import Daemon

pytestmark = pytest.mark.timeout(30)

CLOSE_DEADLINE = 10.0  # seconds a test waits for the daemon to close a connection


@pytest.fixture
async def daemons() -> AsyncIterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        await daemon.stop()


async def start(daemons: list[Daemon], tmp: Path, **http: object) -> Daemon:
    daemon = Daemon(tmp, http=dict(http))
    daemons.append(daemon)
    await daemon.start()
    await daemon.wait_ready()
    return daemon


@contextlib.asynccontextmanager
async def connect(
    daemon: Daemon,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write its own segment
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length body: status, headers, body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_DEADLINE)
    status_line, *header_lines = head.decode().split("\r\n")[:-2]
    headers = {
        name.lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the daemon sent until it closed the connection; fails if it does not."""
    received = b""
    deadline = time.monotonic() + CLOSE_DEADLINE
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), deadline - time.monotonic()):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the daemon kept the connection open; got {received!r}") from None
    return received


async def test_idle_kept_alive_connection_is_closed_after_keepalive_timeout(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = await start(daemons, tmp_path, keepalive_timeout=1.0)
    async with connect(daemon) as (reader, writer):
        # Kept alive: a second request on the same connection is answered...
        for _ in range(2):
            writer.write(request("GET", "/health"))
            status, headers, body = await answer(reader)
            assert (status, json.loads(body)) == (200, {"status": "ready"})
            assert headers.get("connection", "keep-alive").lower() != "close"
        # ...and once idle, the daemon closes it without another byte.
        assert await until_closed(reader) == b""
    # The listener still serves new connections.
    async with connect(daemon) as (reader, writer):
        writer.write(request("GET", "/health", Authorization=AUTH_KEY))
        status, _, body = await answer(reader)
        assert status == 200 and json.loads(body)["status"] == "ready"


async def test_silent_and_slow_header_connections_are_closed_after_header_timeout(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = await start(daemons, tmp_path, header_timeout=0.5)
    events: list[str] = []

    async def silent() -> None:
        async with connect(daemon) as (reader, _):
            assert await until_closed(reader) == b""
            events.append("silent closed")

    async def slow_header() -> None:
        async with connect(daemon) as (reader, writer):
            writer.write(b"POST /task HTT")  # then nothing
            received = await until_closed(reader)
            assert received.startswith(b"HTTP/1.1 408 "), received
            assert json.loads(received.split(b"\r\n\r\n", 1)[1])["success"] is False
            events.append("slow header closed")

    async def normal() -> None:
        # Arrives with the others, in pieces whose end-of-head is split across two writes,
        # and runs longer than header_timeout: once its head is in, it is not cut.
        async with connect(daemon) as (reader, writer):
            body = json.dumps({"function": "sleep", "contract": 1, "input": {"seconds": 1.5}})
            whole = request("POST", "/task", body.encode(), Authorization=AUTH_KEY)
            head_end = whole.index(b"\r\n\r\n")
            for piece in (whole[:10], whole[10 : head_end + 3], whole[head_end + 3 :]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)  # pacing, so that each piece is its own segment
            status, _, answer_body = await answer(reader)
            assert (status, json.loads(answer_body)) == (
                200,
                {"success": True, "result": {"slept": 1.5}},
            )
            events.append("normal answered")

    await asyncio.gather(silent(), slow_header(), normal())
    assert sorted(events[:2]) == ["silent closed", "slow header closed"]
    assert events[2] == "normal answered"


async def test_slow_body_gets_408_and_is_closed_after_body_timeout(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = await start(daemons, tmp_path, body_timeout=1.0)
    events: list[str] = []

    async def slow_body() -> None:
        async with connect(daemon) as (reader, writer):
            head = request("POST", "/task", Authorization=AUTH_KEY)
            writer.write(head.replace(b"Content-Length: 0", b"Content-Length: 100"))
            writer.write(b'{"functio')  # 10 of the 100 bytes announced, then nothing
            received = await until_closed(reader)
            status_line, rest = received.split(b"\r\n", 1)
            assert status_line.startswith(b"HTTP/1.1 408 "), received
            assert b"\r\nconnection: close\r\n" in rest.lower()
            body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
            assert body["success"] is False and "body" in body["error"]
            events.append("slow body closed")

    async def normal() -> None:
        # Starts with the slow one and takes longer than body_timeout, its body in time.
        async with connect(daemon) as (reader, writer):
            body = json.dumps({"function": "sleep", "contract": 1, "input": {"seconds": 2}})
            writer.write(request("POST", "/task", body.encode(), Authorization=AUTH_KEY))
            status, _, answer_body = await answer(reader)
            assert status == 200 and json.loads(answer_body)["result"] == {"slept": 2}
            events.append("normal answered")

    await asyncio.gather(slow_body(), normal())
    assert events == ["slow body closed", "normal answered"]
