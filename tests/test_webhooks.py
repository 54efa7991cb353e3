"""Mode webhook against a real server and a small receiver on loopback inside the test."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import AUTH, LB_KEY, Running, Worker, task, wait_for
from worker import __version__
from worker.giveway import GiveWay

StartWorker = Callable[..., Awaitable[Worker]]
SECRET = "webhook-signing-secret"


@dataclass
class Call:
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers its calls with `script` in order (then 200); `"hang"` never answers."""

    script: list[int | str]
    calls: list[Call] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(Call(time.monotonic(), dict(request.headers), await request.read()))
        answer = self.script[len(self.calls) - 1] if len(self.calls) <= len(self.script) else 200
        if answer == "hang":
            await self.release.wait()  # set at the end of the test
            return web.Response(status=200)
        assert isinstance(answer, int)
        return web.Response(status=answer, text="receiver says hi")

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hook?token=url-secret"))


@pytest.fixture
async def receiver(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> Callable[[list[int | str]], Awaitable[Receiver]]:
    started: list[Receiver] = []

    async def start(script: list[int | str]) -> Receiver:
        receiver = Receiver(script)
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        receiver.server = await aiohttp_server(app, host="127.0.0.1")
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.release.set()


Start = Callable[[list[int | str]], Awaitable[Receiver]]


def webhook_config(**overrides: Any) -> dict[str, Any]:
    return {
        "timeout": 2.0,
        "max_retries": 3,
        "retry_delay": 0.05,
        "secret": SECRET,
        "headers": {"X-Default": "from-config", "X-Override": "from-config"},
        **overrides,
    }


async def health(client: Any) -> dict[str, Any]:
    async with client.get("/health", headers=AUTH) as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def test_retries_on_503_until_accepted_with_signed_body_and_headers(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver([503, 503])
    client, runtime = await worker_app(webhook=webhook_config())
    request_headers = {"X-Override": "from-request", "X-Custom": "custom"}
    body = task(
        "hello",
        mode="webhook",
        input={"name": "Andera"},
        webhook={"url": hook.url, "headers": request_headers},
    )
    with structlog.testing.capture_logs() as logged:
        async with client.post("/task", json=body, headers=AUTH) as resp:
            assert resp.status == 202
            accepted = await resp.json()
            task_id = resp.headers["X-Task-Id"]
        assert accepted["success"] is True
        assert accepted["task_id"] == task_id
        assert isinstance(accepted["message"], str)
        await wait_for(lambda: runtime.deliveries.pending == 0 and len(hook.calls) >= 3)
    assert len(hook.calls) == 3
    final = hook.calls[-1]
    assert json.loads(final.body) == {
        "task_id": task_id,
        "function": "hello",
        "success": True,
        "result": {"message": "Hello Andera!"},
    }
    headers = final.headers
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == f"base-worker/{__version__}"
    assert headers["X-Task-Id"] == task_id
    assert headers["X-Default"] == "from-config"
    assert headers["X-Override"] == "from-request"
    assert headers["X-Custom"] == "custom"
    expected = hmac.new(SECRET.encode(), final.body, hashlib.sha256).hexdigest()
    assert headers["X-Signature-256"] == f"sha256={expected}"
    assert all(call.body == final.body for call in hook.calls)
    # Back-off: the n-th retry waits at least retry_delay * 2^(n-1).
    gaps = [b.at - a.at for a, b in zip(hook.calls, hook.calls[1:], strict=False)]
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.1
    assert (await health(client))["webhooks"] == {
        "pending": 0,
        "delivered": 1,
        "failed": 0,
        "dead": 0,
    }
    # Every attempt and the outcome are logged, with no header value and no URL path.
    webhook_lines = [line for line in logged if str(line["event"]).startswith("webhook")]
    assert [(line["event"], line.get("attempt")) for line in webhook_lines] == [
        ("webhook attempt failed", 1),
        ("webhook attempt failed", 2),
        ("webhook delivered", 3),
    ]
    assert webhook_lines[0]["status"] == 503
    assert (webhook_lines[2]["status"], webhook_lines[2]["attempts"]) == (200, 3)
    everything = repr(logged)
    for value in ("from-config", "from-request", "custom", expected, "url-secret"):
        assert value not in everything


async def test_a_400_is_not_retried_and_failures_are_delivered_as_errors(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver([400])
    client, runtime = await worker_app(webhook=webhook_config())
    body = task("fail", mode="webhook", input={"message": "nope"}, webhook={"url": hook.url})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert resp.status == 202
        task_id = resp.headers["X-Task-Id"]
    await wait_for(lambda: len(hook.calls) >= 1 and runtime.deliveries.pending == 0)
    assert len(hook.calls) == 1
    assert hook.calls[0].body.startswith(b'{"task_id":"')  # compact, as answers are
    assert json.loads(hook.calls[0].body) == {
        "task_id": task_id,
        "function": "fail",
        "success": False,
        "error": "nope",
    }
    assert runtime.deliveries.failed == 1


async def serves_on(client: TestClient[Any, Any], runtime: Running) -> None:
    """The connection that carried a task answers the next one, and no slot is left held."""
    async with client.post("/task", json=task("hello"), headers=AUTH) as resp:
        assert resp.status == 200
    assert runtime.slots.state().used == 0


async def test_a_webhook_task_that_waits_past_its_timeout_times_out_and_its_connection_goes_on(
    worker_app: StartWorker, receiver: Start
) -> None:
    """The deadline cancels the task the function runs in, never its request's."""
    hook = await receiver([])
    client, runtime = await worker_app(webhook=webhook_config())
    body = task("sleep_limited", mode="webhook", input={"seconds": 5}, webhook={"url": hook.url})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert resp.status == 202
        task_id = resp.headers["X-Task-Id"]
    await wait_for(lambda: len(hook.calls) == 1)
    assert json.loads(hook.calls[0].body) == {
        "task_id": task_id,
        "function": "sleep_limited",
        "success": False,
        "error": "Function timed out after 0.3s",
    }
    await serves_on(client, runtime)


@pytest.mark.parametrize("mode", ["sync", "webhook"])
async def test_a_function_that_bounds_its_own_wait_is_cut_short_by_its_own_timeout(
    worker_app: StartWorker, receiver: Start, mode: str
) -> None:
    """asyncio.timeout and TaskGroup take the task they are entered in: a function runs from
    its first step to its last in one task, or they would cancel another (a request's). So a
    webhook task's first step cannot be taken in its request's task to save it a task of its
    own (tried in issue 14's fifteenth pass: this test failed)."""
    hook = await receiver([])
    client, runtime = await worker_app(webhook=webhook_config())
    target = {"webhook": {"url": hook.url}} if mode == "webhook" else {}
    body = task("own_timeout", mode=mode, input={"seconds": 5}, **target)
    async with client.post("/task", json=body, headers=AUTH) as resp:
        answer = await resp.json()
    if mode == "webhook":
        await wait_for(lambda: len(hook.calls) == 1)
        answer = json.loads(hook.calls[0].body)
    assert answer["result"] == {"own_timeout": "passed"}
    await serves_on(client, runtime)


# Linux's SO_TIMESTAMPNS (asm-generic; not in Python's socket module): each read carries the
# time the kernel received its bytes, so two sockets' arrivals can be put in order after the fact.
SO_TIMESTAMPNS = 35


def stamped_read(sock: socket.socket, ends: bytes) -> tuple[int, bytes]:
    """Blocking: read until `ends` has come; the kernel's arrival time (ns) of the first bytes."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    data, first = b"", 0
    while ends not in data:
        chunk, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(16))
        if not chunk:
            raise AssertionError(f"closed after {data!r}")
        for level, kind, value in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS) and not first:
                seconds, nanoseconds = struct.unpack("qq", value[:16])
                first = seconds * 10**9 + nanoseconds
        data += chunk
    assert first, "the kernel gave no receive time"
    return first, data


class StampedReceiver:
    """A webhook receiver on a plain socket, in a thread: answers each POST 200 on a kept-alive
    connection and keeps when each one's first bytes arrived."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.arrivals: list[int] = []
        self.connections = 0
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.listener.accept()
                self.connections += 1
                threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        connection.settimeout(10)
        with connection, contextlib.suppress(OSError, AssertionError):
            while True:
                at, head = stamped_read(connection, b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                assert length is not None
                body = head.split(b"\r\n\r\n", 1)[1]
                while len(body) < int(length[1]):
                    body += connection.recv(65536)
                self.arrivals.append(at)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


async def test_a_webhook_tasks_202_leaves_before_its_result_is_posted(
    worker_app: StartWorker,
) -> None:
    """The 202 reaches its client before the result reaches the receiver, also when the delivery
    goes at once on a kept-alive connection: a receiver may look up the task id its client got.
    (The kernel's receive times of both, read after the fact.)"""
    client, runtime = await worker_app(webhook=webhook_config())
    runtime.deliveries.give_way = GiveWay(pause=0.0, longest=0.0, busy=2.0)  # never holds
    hook = StampedReceiver()
    body = json.dumps(task("hello", mode="webhook", webhook={"url": hook.url})).encode()
    request = (
        f"POST /task HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    answered: list[int] = []
    with socket.create_connection(("127.0.0.1", client.port), timeout=10) as connection:
        for count in range(1, 21):
            connection.sendall(request)
            at, answer = await asyncio.to_thread(stamped_read, connection, b'"}')
            assert answer.startswith(b"HTTP/1.1 202"), answer
            answered.append(at)
            await wait_for(lambda: len(hook.arrivals) == count)  # noqa: B023
    hook.listener.close()
    assert hook.connections == 1  # after the first, each delivery went on a kept-alive one
    assert [a < d for a, d in zip(answered, hook.arrivals, strict=True)] == [True] * 20


async def test_a_receiver_that_never_answers_times_out_and_is_retried(
    worker_app: StartWorker, receiver: Start
) -> None:
    hook = await receiver(["hang"])
    client, runtime = await worker_app(
        webhook=webhook_config(timeout=0.3, max_retries=1, retry_delay=0.01)
    )
    body = task("hello", mode="webhook", webhook={"url": hook.url})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert resp.status == 202
    drained = asyncio.ensure_future(runtime.wait_drained())
    try:
        await wait_for(lambda: len(hook.calls) == 1)
        # The function is done and its slot free while its delivery is still pending,
        # and the drain waits for the delivery.
        assert runtime.slots.state().used == 0
        assert (await health(client))["webhooks"]["pending"] == 1
        assert not drained.done()
        await wait_for(lambda: runtime.deliveries.delivered == 1)
        assert len(hook.calls) == 2
        async with asyncio.timeout(5):
            await drained
    finally:
        drained.cancel()
    assert hook.calls[1].at - hook.calls[0].at >= 0.3


async def test_deliveries_held_back_by_a_burst_go_out_when_the_worker_drains(
    worker_app: StartWorker, receiver: Start
) -> None:
    """A result's first attempt may wait for a burst of accepts to ease (worker/giveway.py);
    held, it counts as pending, and the drain sends it at once instead of waiting."""
    hook = await receiver([])
    client, runtime = await worker_app(webhook=webhook_config())
    # Looks once a minute: the first delivery goes at once, the next two wait for the look.
    runtime.deliveries.give_way = GiveWay(pause=60.0, longest=60.0)
    for _ in range(3):
        body = task("hello", mode="webhook", webhook={"url": hook.url})
        async with client.post("/task", json=body, headers=AUTH) as resp:
            assert resp.status == 202
    await wait_for(lambda: len(hook.calls) == 1 and runtime.dispatcher.in_flight == 0)
    assert runtime.deliveries.give_way.waiting == 2
    assert (await health(client))["webhooks"]["pending"] == 2
    async with asyncio.timeout(5):
        await runtime.wait_drained()
    assert len(hook.calls) == 3 and runtime.deliveries.delivered == 3


async def test_abandoned_deliveries_are_counted(worker_app: StartWorker, receiver: Start) -> None:
    hook = await receiver(["hang"])
    client, runtime = await worker_app(webhook=webhook_config(timeout=30.0))
    body = task("hello", mode="webhook", webhook={"url": hook.url})
    async with client.post("/task", json=body, headers={**AUTH, "x-lb-auth": LB_KEY}) as resp:
        assert resp.status == 202
    await wait_for(lambda: len(hook.calls) == 1)
    assert runtime.deliveries.pending == 1
    assert runtime.deliveries.abandon() == 1
    await wait_for(lambda: runtime.deliveries.pending == 0)
    assert runtime.deliveries.failed == 1
