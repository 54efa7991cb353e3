"""The HTTP listener's edge, against a real daemon over raw loopback sockets: idle, slow-header and
slow-body connections are closed after their timeouts, requests that arrive normally are served,
and a flood of idle connections cannot stop `/health` from answering."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import unused_port

from tests.conftest import AUTH_KEY, LB_KEY
from tests.daemon import Daemon
from worker import server

pytestmark = pytest.mark.timeout(30)

CLOSE_DEADLINE = 10.0  # seconds a test waits for the daemon to close a connection


async def start(
    daemons: list[Daemon],
    tmp: Path,
    preexec_fn: Callable[[], None] | None = None,
    **http: object,
) -> Daemon:
    daemon = Daemon(tmp, http=dict(http))
    daemons.append(daemon)
    await daemon.start(preexec_fn=preexec_fn)
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


async def answer(
    reader: asyncio.StreamReader, with_body: bool = True
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length body: status, headers, body (none read when
    not `with_body`: a HEAD answer announces a body it does not send)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_DEADLINE)
    status_line, *header_lines = head.decode().split("\r\n")[:-2]
    headers = {
        name.lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0"))) if with_body else b""
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


# --- the route a task takes: POST /task skips the router (worker/http.py, Api.entry) ----------


async def test_expect_100_continue_on_post_task_is_answered_before_the_body_is_sent(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    # curl sends Expect for a body over 1 KiB and waits a second for 100 Continue; a client that
    # waits for it without a limit would wait until body_timeout cut the request.
    daemon = await start(daemons, tmp_path)
    body = json.dumps({"function": "hello", "contract": 1, "input": {"name": "Expect"}}).encode()
    whole = request("POST", "/task", body, Authorization=AUTH_KEY, Expect="100-continue")
    async with connect(daemon) as (reader, writer):
        writer.write(whole[: -len(body)])
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_DEADLINE)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        writer.write(body)
        status, _, answer_body = await answer(reader)
    assert (status, json.loads(answer_body)) == (
        200,
        {"success": True, "result": {"message": "Hello Expect!"}},
    )


async def test_requests_near_post_task_are_routed_as_the_router_routes_them(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    # What the router did with each of these before POST /task skipped it, each on one
    # kept-alive connection; the metrics then count the tasks under /task as before.
    daemon = await start(daemons, tmp_path)
    body = json.dumps({"function": "hello", "contract": 1}).encode()
    expected = [
        ("POST", "/task", 200, ""),
        ("POST", "/task?x=1", 200, ""),
        ("POST", "/%74ask", 200, ""),
        ("POST", "/task/", 404, ""),
        ("POST", "/TASK", 404, ""),
        ("POST", "//task", 404, ""),
        ("POST", "/a/../task", 404, ""),
        ("POST", "/tasks", 404, ""),
        ("PUT", "/task", 405, "POST"),
        ("GET", "/task", 405, "POST"),
        ("HEAD", "/task", 405, "POST"),
    ]
    seen = []
    async with connect(daemon) as (reader, writer):
        for method, target, _, _ in expected:
            writer.write(request(method, target, body, Authorization=AUTH_KEY))
            status, headers, answer_body = await answer(reader, with_body=method != "HEAD")
            if method != "HEAD":
                assert json.loads(answer_body)["success"] is (status == 200), answer_body
            seen.append(
                (method, target, status, "POST" if "POST" in headers.get("allow", "") else "")
            )
    assert seen == expected
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{daemon.url}/metrics", headers={"Authorization": AUTH_KEY}) as got,
    ):
        metrics = await got.text()
    assert 'route="/task",status="200"} 3' in metrics, metrics


async def test_the_load_balancer_websocket_port_closes_silent_connections_too(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    """The inbound websocket listener is reachable without a key as well: a connection that
    never sends its upgrade request is closed after keepalive_timeout, not kept for an hour,
    while an open websocket link is not idle and stays."""
    port = unused_port()
    daemon = Daemon(
        tmp_path, http={"keepalive_timeout": 1.0}, load_balancer={"websocket_port": port}
    )
    daemons.append(daemon)
    await daemon.start()
    await daemon.wait_ready()
    async with aiohttp.ClientSession() as session:
        link = await session.ws_connect(f"ws://127.0.0.1:{port}/", protocols=[LB_KEY])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await until_closed(reader) == b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        # The silent one is gone, past keepalive_timeout: the link still answers.
        await link.send_str("ping")
        while (message := await asyncio.wait_for(link.receive(), CLOSE_DEADLINE)).type is (
            aiohttp.WSMsgType.TEXT
        ):
            if "status" in json.loads(message.data):
                break
        else:
            raise AssertionError(f"the link ended: {message!r}")
        await link.close()


# The floods: more idle connections than a shell's usual `ulimit -n` of 1,024.
FLOOD = 1100


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room in this test process for FLOOD client sockets (restored afterwards)."""
    needed = FLOOD + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the open file hard limit ({hard}) is below the {needed} this test needs")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_files(soft: int, hard: int | None = None) -> Callable[[], None]:
    """A preexec_fn for the daemon: `ulimit -Sn soft` (and `-Hn hard`)."""

    def limit() -> None:
        current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, current_hard if hard is None else hard))

    return limit


@contextlib.asynccontextmanager
async def idle_connections(daemon: Daemon, count: int) -> AsyncIterator[list[socket.socket]]:
    """`count` connections that send nothing, opened one after the other, oldest first."""
    loop = asyncio.get_running_loop()
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            opened.append(sock)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", daemon.port))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def is_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def health_answers(
    daemon: Daemon, within: float = 15.0, path: str = "/health"
) -> dict[str, Any]:
    """The detailed /health (or `path`), asked on a new connection each time until it answers."""
    deadline = time.monotonic() + within
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while True:
            try:
                url = f"{daemon.url}{path}"
                async with session.get(url, headers={"Authorization": AUTH_KEY}) as resp:
                    body: dict[str, Any] = await resp.json()
                    return body
            except (aiohttp.ClientError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"/health did not answer in {within} s") from None
                await asyncio.sleep(0.05)


def event(daemon: Daemon, name: str) -> dict[str, Any]:
    found = [e for e in map(json.loads, daemon.log_events()) if e.get("event") == name]
    assert found, f"no {name!r} in the log: {daemon.output[-5:]}"
    return found[0]


async def test_idle_flood_under_ulimit_1024_cannot_stop_health(
    daemons: list[Daemon], tmp_path: Path, many_files: None
) -> None:
    # The hard limit is this host's (above FLOOD + 512, see many_files): the daemon raises to it.
    daemon = await start(daemons, tmp_path, open_files(1024), header_timeout=25.0)
    raised = event(daemon, "open file limit raised")
    assert raised["was"] == 1024 and raised["soft"] > FLOOD
    async with idle_connections(daemon, FLOOD):
        body = await health_answers(daemon)
        assert body["status"] == "ready"
        # Every idle connection was accepted and is still open: none had to be pushed out.
        assert body["http"]["connections"] > FLOOD
        assert body["http"]["evicted"] == body["http"]["refused"] == 0


async def test_idle_flood_at_hard_limit_1024_pushes_out_the_oldest(
    daemons: list[Daemon], tmp_path: Path, many_files: None
) -> None:
    daemon = await start(daemons, tmp_path, open_files(1024, 1024), header_timeout=25.0)
    lowered = event(daemon, "http.max_connections lowered to fit the open file limit")
    bound = lowered["max_connections"]
    assert bound < 1024 and lowered["configured"] == 10000
    async with idle_connections(daemon, FLOOD) as flood:
        body = await health_answers(daemon)
        assert body["status"] == "ready"
        assert body["http"]["maxConnections"] == bound
        assert body["http"]["connections"] <= bound
        assert body["http"]["evicted"] >= FLOOD - bound
        assert await health_answers(daemon, path="/ready") == {"status": "ready"}
        # The oldest idle connections made room, the newest are still open.
        deadline = time.monotonic() + CLOSE_DEADLINE
        while not is_closed(flood[0]):
            assert time.monotonic() < deadline, "the oldest idle connection is still open"
            await asyncio.sleep(0.02)
        assert not is_closed(flood[-1])


async def test_at_max_connections_with_every_one_busy_a_new_one_is_closed(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = await start(daemons, tmp_path, max_connections=3, header_timeout=25.0)
    task = {"function": "stream_until_gone", "contract": 1, "mode": "stream"}
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            reader, writer = await stack.enter_async_context(connect(daemon))
            body = json.dumps({**task, "input": {"gate": "never opened"}}).encode()
            writer.write(request("POST", "/task", body, Authorization=AUTH_KEY))
            # Its stream has begun: the daemon has its request head.
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_DEADLINE)
            assert head.startswith(b"HTTP/1.1 200 ")
        # None is without a request head to make room: the new connection is closed unanswered.
        async with connect(daemon) as (reader, _):
            assert await until_closed(reader) == b""
    # The streams' clients have hung up: there is room again.
    body = await health_answers(daemon)
    assert body["http"]["refused"] >= 1 and body["http"]["maxConnections"] == 3


async def test_a_slow_later_head_on_a_kept_alive_connection_is_cut_at_keepalive_timeout(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    """After the first request, aiohttp's keep-alive timer bounds the next head: it runs from
    the end of the answer while no complete head has arrived, and bytes arriving do not
    restart it."""
    daemon = await start(daemons, tmp_path, keepalive_timeout=1.0, header_timeout=0.5)
    async with connect(daemon) as (reader, writer):
        writer.write(request("GET", "/health"))
        status, _, _ = await answer(reader)
        assert status == 200
        second = request("GET", "/health")[:-2]  # never completed: no blank line

        async def dribble() -> bool:
            with contextlib.suppress(ConnectionError):
                for index in range(len(second)):
                    writer.write(second[index : index + 1])
                    await writer.drain()
                    await asyncio.sleep(0.1)  # one byte every 0.1 s, well inside any timeout
            return True

        dribbling = asyncio.create_task(dribble())
        assert await until_closed(reader) == b""
        assert not dribbling.done(), "the whole head was sent before the connection closed"
        dribbling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dribbling


@pytest.mark.parametrize(
    ("soft", "configured", "bound"),
    [
        (1024, 10000, 1024 - server.FD_RESERVE),  # a shell's ulimit -n
        (65536, 10000, 10000),  # the unit's LimitNOFILE: nothing to lower
        (1024, 100, 100),  # already below
        (300, 10000, 150),  # a tiny limit: the reserve takes at most half
        (resource.RLIM_INFINITY, 10000, 10000),
    ],
)
def test_connection_bound_leaves_a_reserve_of_descriptors(
    monkeypatch: pytest.MonkeyPatch, soft: int, configured: int, bound: int
) -> None:
    monkeypatch.setattr(server.resource, "getrlimit", lambda _: (soft, resource.RLIM_INFINITY))
    assert server.connection_bound(configured) == bound
