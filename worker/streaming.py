"""Mode stream: a function's chunks reach the client as they are produced.

Plain chunked `text/plain`, or server-sent events when the client accepts `text/event-stream`.
The response is opened at the first chunk, so a function that fails before writing anything
gets the ordinary JSON error answer. Once output has begun, a failure aborts a plain stream (no
clean end of the chunked body, so no client mistakes it for success) and ends an event stream
with `event: error`. A client that hangs up cancels the function at its next write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from worker.jsoncodec import NotJSON, dumps_result
from worker.outbox import KeptTransport
from worker.outcomes import FAILED, SUCCEEDED, Reason
from worker.server import connected, on_hang_up
from worker.sync import result_response
from worker.tasks import Dispatcher, Job, TaskResult, TaskSpec

EVENT_STREAM = "text/event-stream"
EVENT_STREAM_TYPE = f"{EVENT_STREAM}; charset=utf-8"
PLAIN_TYPE = "text/plain; charset=utf-8"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def wants_events(request: web.Request) -> bool:
    """True when the client asked for server-sent events."""
    accept = request.headers.get("Accept", "")
    return any(part.split(";")[0].strip().lower() == EVENT_STREAM for part in accept.split(","))


def chunk_text(chunk: Any) -> str:
    """A chunk as text: strings as they are, bytes as UTF-8, anything else as JSON (NotJSON
    when it cannot be)."""
    if isinstance(chunk, str):
        return chunk
    if isinstance(chunk, bytes | bytearray):
        return bytes(chunk).decode("utf-8", errors="replace")
    return dumps_result(chunk)


def plain_bytes(chunk: bytes | bytearray) -> bytes:
    """A bytes chunk as a plain stream sends it, the bytes of `chunk_text(chunk)`: valid UTF-8
    goes out as it is (ASCII without a copy of a bytes chunk), undecodable bytes replaced."""
    data = bytes(chunk)
    if data.isascii():
        return data
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return chunk_text(data).encode()
    return data


def event_frame(data: str, event: str | None = None) -> bytes:
    """One server-sent event; a multi-line chunk becomes several `data:` lines."""
    lines = [f"event: {event}"] if event else []
    lines += [f"data: {line}" for line in _LINE_BREAK.split(data)]
    return ("\n".join(lines) + "\n\n").encode()


# Chunks of at least this many bytes are written as they come; smaller ones produced in one turn
# of the event loop are gathered into one write of up to this size (aiohttp's drain limit).
WRITE_SIZE = 65536


class StreamAnswer:
    """The HTTP side of one streamed task; the task's `ctx.stream` is this object.

    The first chunk opens the response and is written at once. Later small chunks wait in
    `_pending` until the producer yields to the event loop (a flush task then writes them) or
    until they add up to WRITE_SIZE (the producer then writes them itself and waits for the
    client like any write). Written chunks wait in the connection's outbox, up to
    outbox.GATHER_AT_MOST, for the end of the loop's turn, and leave in one write (where
    aiohttp passes pieces; elsewhere a big chunk goes as it is written). A chunk
    therefore reaches the client as soon as the function awaits anything else, and a function
    is never further ahead of its client than one gathered write.
    """

    def __init__(self, request: web.Request, task_id: str, events: bool) -> None:
        self.request = request
        self.task_id = task_id
        self.events = events
        self.job: Job | None = None
        self.client_gone = False
        self._opening = asyncio.Lock()  # only until the headers are out: see _open
        # The response's body writer once it is open (what `prepare` returns): chunks go to it
        # directly, past StreamResponse.write's checks of what this object already knows.
        self._body: AbstractStreamWriter | None = None
        self._ended = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._flusher: asyncio.Task[None] | None = None
        # The headers as aiohttp's content_type and charset setters would write them, without
        # their parsing on every request.
        headers = {
            "X-Task-Id": task_id,
            "Content-Type": EVENT_STREAM_TYPE if events else PLAIN_TYPE,
            "Cache-Control": "no-cache",
        }
        if events:
            headers["X-Accel-Buffering"] = "no"  # proxies: do not hold events back
        self.response = web.StreamResponse(headers=headers)

    @property
    def began(self) -> bool:
        """True once output may have reached the client (the runner then never retries)."""
        return self.response.prepared

    def _encode(self, chunk: Any) -> bytes:
        if self.events:
            return event_frame(chunk_text(chunk))
        if isinstance(chunk, str):
            return chunk.encode()
        if isinstance(chunk, bytes | bytearray):
            return plain_bytes(chunk)  # not through chunk_text: a decode and an encode copied it
        return (chunk_text(chunk) + "\n").encode()

    async def __call__(self, chunk: Any) -> None:
        """Send one chunk; waits while the client is slow to read (aiohttp drains)."""
        if self.client_gone:
            raise self._hang_up()
        if self._ended:
            raise RuntimeError("the stream has ended: no chunk can follow")
        # Plain text, the common chunk, is encoded here: a method call costs as much again.
        data = chunk.encode() if type(chunk) is str and not self.events else self._encode(chunk)
        body = self._body
        if body is None:
            if await self._open(data):
                return
            body = self._body
            assert body is not None  # opened by the writer that won
        pending = self._pending
        if pending or len(data) < WRITE_SIZE:
            pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < WRITE_SIZE:
                if self._flusher is None:
                    self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())
                return
            data = b"".join(pending)
            pending.clear()
            self._pending_size = 0
        try:
            await body.write(data)
        except ConnectionError:
            raise self._left() from None

    async def send_each(self, chunks: AsyncIterator[Any]) -> None:
        """Send each chunk `chunks` yields, as `self(chunk)` would: the runner's loop over a
        streaming function's output. The common chunk, text of a write's size or more while
        the response is open and nothing is gathered, is written here, one coroutine fewer a
        chunk than through `self` (0-4 % of the CPU a streamed megabyte costs, measured)."""
        async for chunk in chunks:
            body = self._body
            if (
                body is None
                or self._pending
                or self.client_gone
                or self._ended
                or self.events
                or type(chunk) is not str
                or len(chunk) < WRITE_SIZE  # in characters: its UTF-8 has at least as many bytes
            ):
                await self(chunk)
                continue
            try:
                await body.write(chunk.encode())
            except ConnectionError:
                raise self._left() from None

    async def _open(self, data: bytes) -> bool:
        """Open the response with `data`; False when another writer opened it meanwhile."""
        # A second writer of a first chunk must not write before the headers exist. Once they
        # do, every write puts its bytes on the transport before it awaits anything, so
        # writers need no lock.
        async with self._opening:
            if self._body is not None:
                return False
            try:
                self._body = await self.response.prepare(self.request)
                await self.response.write(data)
            except ConnectionError:
                raise self._left() from None
            self._gather(True)  # the first chunk went at once; later ones may wait for the turn
            return True

    def _gather(self, on: bool) -> None:
        transport = self.request.transport
        if isinstance(transport, KeptTransport):
            transport.gather(on)

    def _take_pending(self) -> bytes:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        return data

    async def _flush_soon(self) -> None:
        """Write what the producer left pending when it yielded to the loop; one such task at
        a time, so that a client that stops reading holds the producer back (its next writes
        gather up to WRITE_SIZE and then wait in the producer)."""
        try:
            while self._pending:
                await self.response.write(self._take_pending())
        except ConnectionError:
            self.client_gone = True
            if self.job is not None and not self._ended:
                self.job.cancel(Reason.CLIENT_GONE_STREAMING)
        finally:
            self._flusher = None

    def _stop_writing(self) -> None:
        # A flush task still waiting for the client finds nothing more to write.
        self._ended = True
        self._pending.clear()
        self._pending_size = 0

    def _left(self) -> BaseException:
        """A write found the client gone: remember it, and raise what `_hang_up` gives."""
        self.client_gone = True
        return self._hang_up()

    def _hang_up(self) -> BaseException:
        """Cancel the task whose client left; the writer in its own task is cancelled directly
        (cancelling the running task from inside would only land at its next await)."""
        gone = Reason.CLIENT_GONE_STREAMING
        if self.job is None or self.job.task is asyncio.current_task():
            return asyncio.CancelledError(gone)
        self.job.cancel(gone)
        return ConnectionResetError(gone.value)

    async def finish(self, result: TaskResult) -> web.StreamResponse:
        """End the answer according to how the task ended; the connection stops gathering
        writes (the next request on it is answered as any other)."""
        try:
            return await self._finish(result)
        finally:
            self._gather(False)

    async def _finish(self, result: TaskResult) -> web.StreamResponse:
        if self.client_gone:
            self._stop_writing()
            return self.response
        if result.outcome is SUCCEEDED and result.value is not None:
            try:
                chunk_text(result.value)
            except NotJSON as exc:
                result = TaskResult(result.task_id, FAILED, error=str(exc))
        if result.outcome is SUCCEEDED:
            try:
                if result.value is not None:  # a streaming function that returned instead
                    await self(result.value)
                await self._end("end", {"success": True, "task_id": self.task_id})
            except ConnectionError:
                pass  # the client left during the last words; the outcome is already logged
            return self.response
        if not self.began:
            return result_response(result)
        if self.events:
            body = {"success": False, "task_id": self.task_id, "error": result.error}
            with contextlib.suppress(ConnectionError):
                await self._end("error", body)
            return self.response
        # No terminating chunk: the client sees a broken body, never a complete one.
        self._stop_writing()
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        return self.response

    async def _end(self, event: str, body: dict[str, Any]) -> None:
        """The pending chunks, the closing event if any, and the end of the body: one write."""
        self._ended = True
        if self.events:
            self._pending.append(event_frame(json.dumps(body), event))
        if self._body is None:
            self._body = await self.response.prepare(self.request)
        # A flush task waiting for the client has written its bytes already; what is pending
        # now comes after them, so it can go out here.
        await self.response.write_eof(self._take_pending())


class StreamMode:
    """Mode stream: the task runs with its output streamed to its request."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def answer(self, request: web.Request, spec: TaskSpec) -> web.StreamResponse:
        stream = StreamAnswer(request, spec.task_id, wants_events(request))
        dispatcher = self._dispatcher
        # With a slot free, the task runs in this request's task, as in sync. Its client is
        # checked first: were it gone already, on_hang_up would cancel the running task itself,
        # and that cancel could land after the job had ended (Python 3.11 cannot withdraw it).
        if dispatcher.slots.free and connected(request):
            job = dispatcher.take_here(spec, stream)
            ending = dispatcher.run_here(job)
        else:
            job = dispatcher.submit(spec, stream=stream)
            ending = job.result()
        stream.job = job
        # Unlike sync, a stream stops with its client, queued or running.
        undo = on_hang_up(request, lambda: job.cancel(Reason.CLIENT_GONE_STREAMING))
        try:
            result = await ending
        except asyncio.CancelledError:
            job.cancel(Reason.CLIENT_GONE_STREAMING)  # the handler itself was cancelled
            raise
        finally:
            undo()
        return await stream.finish(result)
