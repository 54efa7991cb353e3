"""Delivery connections are kept alive and reused, never past a change of the target policy,
and a reused connection the receiver closed under us costs no attempt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Worker, make_config, task, wait_for
from tests.test_webhook_safety import post
from tests.test_webhooks import webhook_config

StartWorker = Callable[..., Awaitable[Worker]]


async def peer_recording_receiver(
    aiohttp_server: Callable[..., Awaitable[TestServer]], peers: list[int]
) -> TestServer:
    async def hook(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    return await aiohttp_server(app, host="127.0.0.1")


async def deliver_one(client: Any, runtime: Any, url: str, delivered: int) -> None:
    status, answer = await post(client, task("hello", mode="webhook", webhook={"url": url}))
    assert status == 202, answer
    await wait_for(lambda: runtime.deliveries.delivered + runtime.deliveries.failed == delivered)


async def test_deliveries_to_one_receiver_reuse_a_connection(
    worker_app: StartWorker, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    peers: list[int] = []
    server = await peer_recording_receiver(aiohttp_server, peers)
    client, runtime = await worker_app(webhook=webhook_config())
    for n in range(1, 4):
        await deliver_one(client, runtime, str(server.make_url("/hook")), n)
    assert runtime.deliveries.delivered == 3
    assert len(peers) == 3 and len(set(peers)) == 1


async def test_a_receivers_cookie_never_goes_out_with_another_delivery(
    worker_app: StartWorker, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """Deliveries of different clients' tasks share a session: a cookie one receiver set would
    otherwise ride along with every later delivery to its host."""
    cookies: list[str | None] = []

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        cookies.append(request.headers.get("Cookie"))
        response = web.Response(status=200)
        response.set_cookie("session", "first-task-only", path="/")
        return response

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app, host="127.0.0.1")
    client, runtime = await worker_app(webhook=webhook_config())
    for n in range(1, 4):  # a name: aiohttp's default jar keeps no cookie of an IP address
        await deliver_one(client, runtime, f"http://localhost:{server.port}/hook", n)
    assert runtime.deliveries.delivered == 3
    assert cookies == [None, None, None]


async def test_a_policy_change_drops_the_connections_checked_under_the_old_one(
    worker_app: StartWorker, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    peers: list[int] = []
    server = await peer_recording_receiver(aiohttp_server, peers)
    client, runtime = await worker_app(webhook=webhook_config(retry_delay=0.01))
    # A name, so that only the resolver (at connect time) can refuse it after the reload.
    url = f"http://localhost:{server.port}/hook"
    await deliver_one(client, runtime, url, 1)
    assert runtime.deliveries.delivered == 1
    runtime.apply(make_config(webhook=webhook_config(deny=["127.0.0.0/8", "::1"])))
    with structlog.testing.capture_logs() as logged:
        await deliver_one(client, runtime, url, 2)
    assert runtime.deliveries.failed == 1 and len(peers) == 1
    [undelivered] = [line for line in logged if line["event"] == "webhook undelivered"]
    assert "webhook.deny" in undelivered["error"] and undelivered["attempts"] == 1


class ClosingOnReuse:
    """A raw HTTP/1.1 receiver answering the first request of each connection with a
    keep-alive 200 and closing the connection, unanswered, on the second: a receiver whose
    idle timeout fired just as the worker reused the connection."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []  # every request that got a 200, in order
        self.closed_unanswered = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for number in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                if number == 1:
                    self.closed_unanswered += 1
                    break
                self.requests.append(body)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def closing_on_reuse() -> AsyncIterator[ClosingOnReuse]:
    receiver = ClosingOnReuse()
    receiver.server = await asyncio.start_server(receiver.serve, "127.0.0.1", 0)
    yield receiver
    receiver.server.close()
    await receiver.server.wait_closed()


async def test_a_reused_connection_closed_by_the_receiver_is_sent_again_in_the_same_attempt(
    worker_app: StartWorker, closing_on_reuse: ClosingOnReuse
) -> None:
    client, runtime = await worker_app(webhook=webhook_config(max_retries=0))
    with structlog.testing.capture_logs() as logged:
        for n in range(1, 4):
            await deliver_one(client, runtime, closing_on_reuse.url, n)
    assert (runtime.deliveries.delivered, runtime.deliveries.failed) == (3, 0)
    assert len(closing_on_reuse.requests) == 3 and closing_on_reuse.closed_unanswered == 2
    assert not [line for line in logged if line["event"] == "webhook attempt failed"]
    delivered = [line for line in logged if line["event"] == "webhook delivered"]
    assert [line["attempts"] for line in delivered] == [1, 1, 1]
