"""The outbox, over real loopback connections: small writes wait for the end of the loop's turn
and leave in order, one write per connection; a big write, a close or the loop's own use of the
transport sends what waits first; a client that has gone costs nothing and holds no one up."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import http_writer
from aiohttp.base_protocol import BaseProtocol

from worker.outbox import (
    GATHER_AT_MOST,
    KEEP_AT_MOST,
    KeptTransport,
    Outbox,
    pass_pieces_on,
    pieces_pass,
)

pytestmark = pytest.mark.timeout(30)

DEADLINE = 10.0  # seconds a test waits for bytes to arrive


class Writes(asyncio.Protocol):
    """The server side: the transport it was given, and how many writes reached it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


class Counted:
    """A real transport that counts the writes it is given (the outbox's only way out), and
    keeps what it was handed as pieces (`writelines`), as handed."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []
        self.pieces: list[list[Any]] = []
        original, original_lines = transport.write, transport.writelines

        def write(data: bytes | bytearray | memoryview) -> None:
            self.writes.append(bytes(data))
            original(data)

        def writelines(pieces: Any) -> None:
            self.pieces.append(list(pieces))
            original_lines(pieces)

        transport.write = write  # type: ignore[method-assign]
        transport.writelines = writelines  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def connected(outbox: Outbox) -> AsyncIterator[tuple[KeptTransport, Counted, socket.socket]]:
    """A loopback connection: the server's transport wrapped by `outbox`, and the client socket."""
    loop = asyncio.get_running_loop()
    server_side, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(Writes, server_side)
    counted = Counted(transport)
    try:
        yield outbox.wrap(transport), counted, client
    finally:
        transport.close()
        client.close()


def nothing_to_read(client: socket.socket) -> bool:
    try:
        client.recv(1)
    except BlockingIOError:
        return True
    return False


async def read_exactly(client: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    deadline = time.monotonic() + DEADLINE
    while len(got) < size and time.monotonic() < deadline:
        chunk = await asyncio.wait_for(loop.sock_recv(client, size - len(got)), DEADLINE)
        if not chunk:
            break
        got += chunk
    return got


async def test_small_writes_leave_at_the_end_of_the_turn_one_write_per_connection() -> None:
    outbox = Outbox(asyncio.get_running_loop())
    async with (
        connected(outbox) as (first, first_out, first_client),
        connected(outbox) as (second, second_out, second_client),
    ):
        first.write(b"HTTP/1.1 200 OK\r\n")
        second.write(b"one ")
        first.writelines([b"Content-Length: 2\r\n", b"\r\n"])
        second.write(bytearray(b"two"))
        first.write(memoryview(b"ok"))
        # Still in the turn that wrote them: nothing has reached a socket.
        assert first_out.writes == [] and second_out.writes == []
        assert nothing_to_read(first_client) and nothing_to_read(second_client)

        expected = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        assert await read_exactly(first_client, len(expected)) == expected
        assert await read_exactly(second_client, 7) == b"one two"
        assert first_out.writes == [expected]
        assert second_out.writes == [b"one two"]


async def test_a_mutable_buffer_is_sent_as_it_was_when_written() -> None:
    outbox = Outbox(asyncio.get_running_loop())
    async with connected(outbox) as (kept, _, client):
        buffer = bytearray(b"frame")
        kept.write(buffer)
        buffer[:] = b"XXXXX"  # its writer reuses it within the turn
        assert await read_exactly(client, 5) == b"frame"


async def test_a_big_write_sends_what_waits_first_then_itself_at_once() -> None:
    outbox = Outbox(asyncio.get_running_loop())
    async with connected(outbox) as (kept, out, client):
        big = b"x" * (KEEP_AT_MOST + 1)
        kept.write(b"head ")
        kept.write(big)
        # Both reached the transport in this turn, in the order written.
        assert out.writes == [b"head ", big]
        assert await read_exactly(client, 5 + len(big)) == b"head " + big

        kept.write(b"a" * (KEEP_AT_MOST - 10))
        kept.write(b"b" * 20)  # past the bound together: what waits goes, then this
        assert out.writes[2:] == [b"a" * (KEEP_AT_MOST - 10), b"b" * 20]
        assert await read_exactly(client, KEEP_AT_MOST + 10) == out.writes[2] + out.writes[3]


@pytest.mark.parametrize("end", ["close", "abort"])
async def test_close_sends_what_waits_before_closing(end: str) -> None:
    """Abort too: a failed stream aborts its connection in the turn that wrote its last chunk,
    which the socket's own transport would have sent at once."""
    outbox = Outbox(asyncio.get_running_loop())
    async with connected(outbox) as (kept, out, client):
        kept.write(b"last words")
        getattr(kept, end)()
        assert out.writes == [b"last words"]
        assert await read_exactly(client, 10) == b"last words"
        assert await read_exactly(client, 1) == b""  # then the end of the connection


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="from 3.12 on, aiohttp's own choice")
async def test_a_streamed_chunk_reaches_the_sockets_transport_uncopied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp's chunked body writer hands a chunk and its frame on as pieces, through the
    outbox, the chunk itself (not a copy) among them; the client reads the framed chunk."""
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(http_writer, "SKIP_WRITELINES", True)  # aiohttp's choice on 3.11
    assert pass_pieces_on() is True
    assert http_writer.SKIP_WRITELINES is False
    assert pass_pieces_on() is False  # once is enough
    async with connected(Outbox(loop)) as (kept, out, client):
        protocol = BaseProtocol(loop)
        protocol.transport = kept
        writer = http_writer.StreamWriter(protocol, loop)
        writer.enable_chunking()
        chunk = b"x" * 65536
        await writer.write(chunk)
        assert out.pieces == [[b"10000\r\n", chunk, b"\r\n"]]
        assert out.pieces[0][1] is chunk
        framed = b"10000\r\n" + chunk + b"\r\n"
        assert await read_exactly(client, len(framed)) == framed


def on_uvloop(test: Callable[[KeptTransport, socket.socket], Awaitable[None]]) -> None:
    """Run `test` on a uvloop loop, with a connection through the outbox and its client.
    (uvloop's transports cannot be counted: their methods are read-only.)"""
    uvloop = pytest.importorskip("uvloop")

    async def connected_on_uvloop() -> None:
        loop = asyncio.get_running_loop()
        server_side, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(Writes, server_side)
        try:
            await test(Outbox(loop).wrap(transport), client)
        finally:
            transport.close()
            client.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(connected_on_uvloop())
    finally:
        loop.close()


def test_pieces_leave_whole_and_in_order_through_uvloops_writev() -> None:
    """uvloop sends pieces with one writev, not joined: what was kept goes first, then each
    piece in order."""

    async def pieces_through_the_outbox(kept: KeptTransport, client: socket.socket) -> None:
        chunk = b"y" * 65536
        kept.write(b"kept ")
        kept.writelines((b"10000\r\n", chunk, b"\r\n"))
        expected = b"kept 10000\r\n" + chunk + b"\r\n"
        assert await read_exactly(client, len(expected)) == expected

    on_uvloop(pieces_through_the_outbox)


def framed(chunk: bytes) -> tuple[bytes, bytes, bytes]:
    """A chunk as aiohttp's chunked writer hands it on: its frame, itself, the frame's end."""
    return (f"{len(chunk):x}\r\n".encode(), chunk, b"\r\n")


def lettered(count: int) -> list[bytes]:
    """`count` chunks of 64 KiB, each of its own letter."""
    return [bytes([ord("a") + index]) * 65536 for index in range(count)]


def on_the_wire(chunks: list[bytes]) -> bytes:
    """What the client reads of `chunks` written framed."""
    return b"".join(b"".join(framed(chunk)) for chunk in chunks)


@contextlib.asynccontextmanager
async def streaming(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[KeptTransport, Counted, socket.socket]]:
    """A connection as a stream's: aiohttp passes pieces, and the outbox gathers them."""
    monkeypatch.setattr(http_writer, "SKIP_WRITELINES", False)
    async with connected(Outbox(asyncio.get_running_loop())) as (kept, out, client):
        kept.gather(True)
        assert kept.gathering
        yield kept, out, client


async def test_a_streaming_connection_gathers_its_chunks_into_one_write_a_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with streaming(monkeypatch) as (kept, out, client):
        chunks = lettered(3)
        for chunk in chunks:
            kept.writelines(framed(chunk))
        assert out.pieces == [] and out.writes == []  # still this turn: all three wait
        expected = on_the_wire(chunks)
        assert await read_exactly(client, len(expected)) == expected
        # One write, of the pieces as they were handed over: no chunk was copied.
        assert len(out.pieces) == 1
        assert [id(piece) for piece in out.pieces[0][1::3]] == [id(chunk) for chunk in chunks]


async def test_gathering_sends_at_its_bound_what_waits_and_the_new_chunk_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with streaming(monkeypatch) as (kept, out, client):
        chunk = b"z" * 65536
        per_chunk = len(b"".join(framed(chunk)))
        fit = GATHER_AT_MOST // per_chunk  # chunks kept before the bound is passed
        for _ in range(fit + 2):
            kept.writelines(framed(chunk))
        # The chunk that passed the bound went in the same turn, with all kept before it.
        assert [len(pieces) for pieces in out.pieces] == [3 * (fit + 1)]
        total = per_chunk * (fit + 2)
        assert await read_exactly(client, total) == b"".join(framed(chunk)) * (fit + 2)
        assert [len(pieces) for pieces in out.pieces] == [3 * (fit + 1), 3]  # the last: at the end


async def test_gathering_off_sends_a_streamed_chunk_at_once_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with streaming(monkeypatch) as (kept, out, client):
        kept.gather(False)
        assert not kept.gathering
        chunk = b"w" * 65536
        kept.writelines(framed(chunk))
        assert out.pieces == [list(framed(chunk))]  # in this turn
        assert await read_exactly(client, len(chunk) + 9) == b"".join(framed(chunk))


async def test_gathering_stays_off_where_aiohttp_joins_each_chunk_to_its_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where aiohttp hands each chunk on joined (a copy made already), the outbox would have
    to join them again to gather them: it does not."""
    monkeypatch.setattr(http_writer, "SKIP_WRITELINES", True)
    assert not pieces_pass()
    async with connected(Outbox(asyncio.get_running_loop())) as (kept, out, client):
        kept.gather(True)
        assert not kept.gathering
        data = b"".join(framed(b"v" * 65536))
        kept.write(data)
        assert out.writes == [data]  # in this turn
        assert await read_exactly(client, len(data)) == data


def test_gathered_chunks_leave_whole_and_in_order_through_uvloops_writev(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The event loop the daemon runs on: gathered chunks, past the bound and at the end of the
    turn, arrive whole and in order."""
    monkeypatch.setattr(http_writer, "SKIP_WRITELINES", False)
    chunks = lettered(6)

    async def gathered(kept: KeptTransport, client: socket.socket) -> None:
        kept.gather(True)
        assert kept.gathering
        for chunk in chunks:
            kept.writelines(framed(chunk))
        expected = on_the_wire(chunks)
        assert await read_exactly(client, len(expected)) == expected

    on_uvloop(gathered)


def test_pass_pieces_on_leaves_later_pythons_and_other_aiohttps_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_writer, "SKIP_WRITELINES", False)  # as aiohttp sets it on 3.12.9+
    assert pass_pieces_on() is False
    assert http_writer.SKIP_WRITELINES is False
    monkeypatch.delattr(http_writer, "SKIP_WRITELINES")  # an aiohttp without the flag
    assert pass_pieces_on() is False
    assert not hasattr(http_writer, "SKIP_WRITELINES")


async def test_the_loops_sendfile_sends_what_waits_first(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    outbox = Outbox(loop)
    body = tmp_path / "asset.js"
    body.write_bytes(b"console.log(1);\n" * 100)
    async with connected(outbox) as (kept, _, client):
        kept.write(b"headers\r\n\r\n")  # a FileResponse's head, then its file
        with body.open("rb") as file:
            await loop.sendfile(kept, file)
        expected = b"headers\r\n\r\n" + body.read_bytes()
        assert await read_exactly(client, len(expected)) == expected


async def test_a_client_gone_before_the_turn_ends_costs_nothing_and_holds_no_one_up() -> None:
    outbox = Outbox(asyncio.get_running_loop())
    async with (
        connected(outbox) as (gone, gone_out, _),
        connected(outbox) as (staying, staying_out, staying_client),
    ):
        gone.write(b"never read")
        staying.write(b"answer")
        gone_out.transport.abort()  # the connection is lost before the outbox sends
        assert await read_exactly(staying_client, 6) == b"answer"
        assert gone_out.writes == []
        assert staying_out.writes == [b"answer"]


async def test_a_connection_whose_write_fails_holds_no_other_answer_back() -> None:
    outbox = Outbox(asyncio.get_running_loop())
    async with (
        connected(outbox) as (failing, failing_out, _),
        connected(outbox) as (staying, _, staying_client),
    ):

        def refuse(data: bytes | bytearray | memoryview) -> None:
            raise RuntimeError("the transport refused")

        failing_out.transport.write = refuse  # type: ignore[method-assign]
        failing.write(b"lost")
        staying.write(b"answer")
        with pytest.raises(RuntimeError, match="refused"):
            outbox.send_all()  # as the loop calls it at the end of the turn
        assert await read_exactly(staying_client, 6) == b"answer"
