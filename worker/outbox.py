"""Answers written together: a connection's small writes wait until the event loop has run what
is ready, then every connection's go out back to back, one `write` each.

Written the moment each answer was ready, the sends came one per task with a task's work between
them, and on loopback each one woke the client again: about a third of the worker's CPU per
request at 64 connections went to the kernel's send path (docs/performance.md, sixth pass). The
wait is the rest of the loop's turn, and the bytes kept are bounded per connection: a bigger
write sends what waits, then itself.

A connection that is streaming a response gathers its chunks the same way, as the pieces aiohttp
hands over (a chunk and its frame, not joined), up to GATHER_AT_MOST bytes: 64 KiB chunks that a
function yields in one turn of the loop then cost one `writev` per 256 KiB, not one per chunk.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from aiohttp import http_writer

KEEP_AT_MOST = 16 * 1024  # bytes one connection keeps for the end of the turn
GATHER_AT_MOST = 256 * 1024  # the same while it streams (KeptTransport.gather)


def pieces_pass() -> bool:
    """True when aiohttp hands a chunk and its frame on as pieces (`writelines`): Python 3.11
    after `pass_pieces_on`, 3.12.9 and later by aiohttp's own choice."""
    return getattr(http_writer, "SKIP_WRITELINES", True) is False


def pass_pieces_on() -> bool:
    """Have aiohttp hand a body chunk and its chunked-encoding frame to the transport as pieces
    (`writelines`) on Python 3.11, as it does itself from 3.12.9, instead of first joining them
    into a copy of the chunk. True when that changed aiohttp's choice.

    aiohttp joins the pieces on any Python before 3.12.9 (its `SKIP_WRITELINES`): from 3.12.0
    to 3.12.8 asyncio's own `writelines` did not respect the write buffer's limit
    (CVE-2024-12254), and before 3.12 it joined the pieces itself, so passing them saved
    nothing. On 3.11 asyncio's `writelines` is still that join, while uvloop's sends the pieces
    with one `writev`: a stream's 64 KiB chunk is copied once fewer (docs/performance.md, issue
    14's twelfth pass). Later Pythons are left to aiohttp. The flag is aiohttp's own, not its
    API: without it (another aiohttp), nothing changes and the pieces are joined as before."""
    if sys.version_info >= (3, 12) or getattr(http_writer, "SKIP_WRITELINES", None) is not True:
        return False
    http_writer.SKIP_WRITELINES = False
    return True


class Outbox:
    """The connections with bytes kept, and the one callback a turn that sends them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: list[KeptTransport] = []

    def wrap(self, transport: asyncio.Transport) -> KeptTransport:
        """The transport to hand the protocol: its small writes are kept for the end of the turn."""
        return KeptTransport(self, transport)

    def keep(self, kept: KeptTransport) -> None:
        if not self._waiting:
            self._loop.call_soon(self.send_all)
        self._waiting.append(kept)

    def send_all(self) -> None:
        """Send every connection's kept bytes now; one that fails does not keep the others'
        answers back (the first error is raised once all were tried)."""
        waiting, self._waiting = self._waiting, []
        error: Exception | None = None
        for kept in waiting:
            try:
                kept.send()
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error


class KeptTransport(asyncio.Transport):
    """A connection's transport as its protocol sees it: writes of at most KEEP_AT_MOST bytes in
    all are kept until the outbox sends them; everything else sends what is kept first, so the
    bytes leave in the order they were written."""

    __slots__ = ("__weakref__", "_at_most", "_kept", "_outbox", "_size", "_transport")

    def __init__(self, outbox: Outbox, transport: asyncio.Transport) -> None:
        super().__init__()
        self._outbox = outbox
        self._transport = transport
        self._kept: list[bytes] | None = None
        self._size = 0  # bytes kept
        self._at_most = KEEP_AT_MOST

    def gather(self, on: bool) -> None:
        """While on, keep up to GATHER_AT_MOST bytes (a stream's chunks), sent as pieces; off,
        KEEP_AT_MOST again. Only where aiohttp passes pieces (`pieces_pass`): otherwise each
        chunk comes joined to its frame already, and gathering would need a second copy.
        Pieces are kept as they are handed over, not copied: a stream writes bytes."""
        self._at_most = GATHER_AT_MOST if on and pieces_pass() else KEEP_AT_MOST

    @property
    def gathering(self) -> bool:
        """True while `gather` is on and took effect."""
        return self._at_most > KEEP_AT_MOST

    def write(self, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        if self._size + size > self._at_most:
            if self._kept is not None:
                self.send()
            self._transport.write(data)
            return
        if self._kept is None:
            self._kept = []
            self._outbox.keep(self)
        # A copy of a mutable buffer: its writer may reuse it before the turn ends.
        self._kept.append(data if type(data) is bytes else bytes(data))
        self._size += size

    def writelines(self, list_of_data: Any) -> None:
        # aiohttp hands a tuple: a chunk with its frame (pass_pieces_on), or a head and a body.
        chunks = list_of_data if type(list_of_data) is tuple else tuple(list_of_data)
        size = self._size
        for data in chunks:
            size += len(data)
        if size <= KEEP_AT_MOST:
            self.write(b"".join(chunks))
            return
        kept = self._kept
        if kept is None:
            if size > self._at_most:
                self._transport.writelines(chunks)  # a stream's chunk: not joined into a copy
                return
            kept = self._kept = []
            self._outbox.keep(self)
        kept.extend(chunks)
        self._size = size
        if size > self._at_most:
            self.send()  # what was kept and these pieces, in one write

    def send(self) -> None:
        """Write what is kept to the connection (nothing when the client has gone)."""
        kept, size, self._kept, self._size = self._kept, self._size, None, 0
        if not kept or self._transport.is_closing():
            return
        if len(kept) == 1:
            self._transport.write(kept[0])
        elif size <= KEEP_AT_MOST:
            self._transport.write(b"".join(kept))
        else:
            self._transport.writelines(kept)  # pieces: only ever kept where pieces pass

    def close(self) -> None:
        self.send()
        self._transport.close()

    def write_eof(self) -> None:
        self.send()
        self._transport.write_eof()

    def abort(self) -> None:
        # What was written goes out first, as from the socket's own transport, which hands a
        # write to the socket at once (a stream that fails aborts in the turn it wrote).
        self.send()
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    # asyncio's selector loop sends a file (FileResponse: the API docs' assets) on its
    # transport's socket itself, through these names: what is kept goes first. They are named
    # one by one: a class with __getattr__ makes every attribute read on its instances slower
    # (aiohttp's and its own, some twenty a request), and none of them can be specialized.

    @property
    def _sendfile_compatible(self) -> Any:
        return getattr(self._transport, "_sendfile_compatible")  # noqa: B009

    @property
    def _sock(self) -> Any:
        self.send()
        return getattr(self._transport, "_sock")  # noqa: B009 - private to asyncio's transport

    @property
    def _sock_fd(self) -> Any:
        return getattr(self._transport, "_sock_fd")  # noqa: B009

    def _make_empty_waiter(self) -> Any:
        self.send()
        return getattr(self._transport, "_make_empty_waiter")()  # noqa: B009

    def _reset_empty_waiter(self) -> None:
        getattr(self._transport, "_reset_empty_waiter")()  # noqa: B009
