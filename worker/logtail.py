"""GET /logs: the last lines of the log buffer, or a live follow of new lines.

A follower gets its own bounded queue fed by the buffer's listener, which only appends (or
counts a dropped line) and never waits: many slow readers cannot slow the logger or the tasks
that log. A reader that falls behind is told how many lines it lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections import deque

from aiohttp import web

from worker.errors import BadRequest
from worker.logs import LogBuffer
from worker.responses import json_response
from worker.server import connected

FOLLOW_QUEUE = 1000  # lines a follower may fall behind before it loses some
ALIVE_CHECK = 2.0  # seconds between checks that an idle follower's client is still there
MAX_LINES = 999_999_999  # `lines=N`: nine digits at most, far above any buffer
_COUNT = re.compile(r"^\s*\d{1,9}\s*$")
_YES = ("1", "true", "yes", "on")
_NO = ("", "0", "false", "no", "off")


class Follower:
    """New log lines for one reader, at most `capacity` behind."""

    def __init__(self, buffer: LogBuffer, capacity: int = FOLLOW_QUEUE) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._capacity = capacity
        self._lines: deque[str] = deque()
        self._dropped = 0
        self._lock = threading.Lock()  # functions running in threads log too
        self._ready = asyncio.Event()
        self.closed = False
        self._undo = buffer.listen(self._on_line, self.close)

    def _on_line(self, line: str) -> None:
        with self._lock:
            if len(self._lines) < self._capacity:
                self._lines.append(line)
            else:
                self._dropped += 1
        if self._ready.is_set():
            return
        if threading.get_ident() == self._loop_thread:
            self._ready.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self, wait: float) -> list[str]:
        """The lines queued since the last call (waiting up to `wait` s for one), oldest first,
        followed by a notice if some were dropped."""
        if not self._pending() and not self.closed:
            self._ready.clear()
            if not self._pending():  # a line may have come between the check and the clear
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._ready.wait()
        with self._lock:
            batch = list(self._lines)
            self._lines.clear()
            dropped, self._dropped = self._dropped, 0
        if dropped:
            batch.append(f"... {dropped} lines dropped (reader too slow)")
        return batch

    def _pending(self) -> bool:
        return bool(self._lines or self._dropped)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._undo()
            self._ready.set()


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    if not _COUNT.match(value):
        raise BadRequest(
            "Query parameter 'lines' must be a non-negative integer",
            details={"lines": ["Not a valid non-negative integer."]},
        )
    return int(value)


def _follow(value: str | None) -> bool:
    lowered = (value or "").strip().lower()
    if lowered in _YES:
        return True
    if lowered in _NO:
        return False
    raise BadRequest(
        "Query parameter 'follow' must be 1 or 0",
        details={"follow": ["Not a valid boolean."]},
    )


async def answer(request: web.Request, logs: LogBuffer) -> web.StreamResponse:
    """`{"logs": [...]}`, oldest first; with `follow=1`, new lines as text until the client goes
    or the daemon stops."""
    count = _count(request.query.get("lines"))
    if not _follow(request.query.get("follow")):
        return json_response({"logs": logs.tail(count)})
    # Listen before anything else so that no line written after the request arrived is missed.
    follower = Follower(logs)
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/plain"
    response.charset = "utf-8"
    try:
        backlog = logs.tail(count) if count else []
        await response.prepare(request)
        if backlog:
            await response.write(("\n".join(backlog) + "\n").encode())
        while not follower.closed:
            batch = await follower.take(ALIVE_CHECK)
            if batch:
                await response.write(("\n".join(batch) + "\n").encode())
            elif not connected(request):
                break  # the client left while nothing was logged
        await response.write_eof()
    except ConnectionError:
        pass  # the client left
    finally:
        follower.close()
    return response
