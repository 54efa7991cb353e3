"""Logging: one structlog pipeline that writes each line to the output and to the /logs buffer.

Secrets are masked in the rendered line, the last step before it leaves the process, so no
processor, renderer or library can leak one. The standard library's records (aiohttp's) are
routed through the same pipeline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from worker import jsoncodec
from worker.config import Config
from worker.parts import Part

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# syslog priorities, which journald reads from a `<N>` prefix
_JOURNAL_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "exception": 3, "critical": 2}
MASK = "***"
# An Authorization or x-lb-auth value, whoever renders one (a library, a function's own log),
# in any quoting, JSON-escaped quotes included.
_CREDENTIAL = re.compile(
    r"(?i)(authorization|x-lb-auth)(\\?[\"']?\s*[:=]\s*\\?[\"']?\s*)((?:bearer|basic)\s+)?"
    r"[^\s\"'\\,;}\]]+"
)
# A secret is masked only where it stands whole: not inside a longer run of these characters.
_TOKEN_CHARS = r"A-Za-z0-9_\-"


def mask_credentials(line: str) -> str:
    """`Authorization: <value>` -> `Authorization: ***`, in any quoting."""
    if "auth" not in line.lower():
        return line
    return _CREDENTIAL.sub(lambda m: f"{m[1]}{m[2]}{m[3] or ''}{MASK}", line)


class Masker:
    """Replaces whole secret values, as they are or JSON-escaped, and nothing else: with a
    key `k`, the word `task` stays `task`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = {form for secret in secrets if secret for form in _written_forms(secret)}
        self._forms = tuple(sorted(forms, key=len, reverse=True))  # a longer one wins
        alternatives = "|".join(re.escape(form) for form in self._forms)
        self._pattern = (
            re.compile(f"(?<![{_TOKEN_CHARS}])(?:{alternatives})(?![{_TOKEN_CHARS}])")
            if alternatives
            else None
        )

    def mask(self, line: str) -> str:
        if self._pattern is not None:
            for form in self._forms:  # a plain loop: a generator costs more than the scans
                if form in line:
                    line = self._pattern.sub(MASK, line)
                    break
        return mask_credentials(line)

    # The sink calls `mask`: calling an object costs some 600 instructions more than a method.
    __call__ = mask


def _written_forms(secret: str) -> set[str]:
    """The secret as it is, and as it reads inside a JSON string (once and twice escaped)."""
    once = json.dumps(secret)[1:-1]
    return {secret, once, json.dumps(once)[1:-1]}


class Throttle:
    """At most one line per `every` seconds for each key (a remote address); the line that may
    be written says how many were suppressed since the last one. Remembers at most `keys`."""

    def __init__(
        self, every: float = 1.0, keys: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._every = every
        self._keys = keys
        self._clock = clock
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def allow(self, key: str) -> int | None:
        """The suppressed count when a line may be written now, else None."""
        now = self._clock()
        written, suppressed = self._seen.get(key, (-self._every, 0))
        if now - written < self._every:
            self._seen[key] = (written, suppressed + 1)
            return None
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        if len(self._seen) > self._keys:
            self._seen.popitem(last=False)
        return suppressed


Listener = Callable[[str], None]


class LogBuffer:
    """The last `max_lines` lines, oldest first, and whoever follows new ones."""

    def __init__(self, max_lines: int) -> None:
        self.lines: deque[str] = deque(maxlen=max_lines)
        self._listeners: list[Listener] = []
        self._closers: list[Callable[[], None]] = []

    def resize(self, max_lines: int) -> None:
        if max_lines != self.lines.maxlen:
            self.lines = deque(self.lines, maxlen=max_lines)

    def tail(self, count: int | None = None) -> list[str]:
        if count is None or count >= len(self.lines):
            return list(self.lines)
        return list(self.lines)[len(self.lines) - count :] if count > 0 else []

    def listen(self, listener: Listener, on_close: Callable[[], None]) -> Callable[[], None]:
        """Call `listener(line)` for every new line (it must never block) and `on_close()` when
        the daemon stops; returns the undo."""
        self._listeners.append(listener)
        self._closers.append(on_close)

        def undo() -> None:
            self._listeners.remove(listener)
            self._closers.remove(on_close)

        return undo

    def close(self) -> None:
        """Tell every listener that no more lines will come (it then undoes its listen)."""
        for on_close in list(self._closers):
            on_close()

    def append(self, line: str) -> None:
        self.lines.append(line)
        for listener in self._listeners:
            listener(line)


class _Sink:
    """The structlog 'logger': masks, writes the line, and keeps it for /logs.

    On the event loop, lines are kept and written together once the loop has run what is
    ready: one write for the lines of many tasks under load, not one each (the units run with
    PYTHONUNBUFFERED=1, where every write to stdout is a system call). Outside the loop
    (threads, start-up) a line is written at once."""

    def __init__(self, output: TextIO, buffer: LogBuffer) -> None:
        self.output = output
        self.buffer = buffer
        self.masker = Masker(())
        self._pending: list[str] | None = None  # lines waiting for the loop's write
        self._loop_thread = 0

    def msg(self, line: str) -> None:
        line = self.masker.mask(line)
        if self._pending is not None and threading.get_ident() == self._loop_thread:
            self._pending.append(line)
        else:
            self._write_soon(line)
        self.buffer.append(line)

    def _write_soon(self, line: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write([line])
            return
        self._pending = [line]
        self._loop_thread = threading.get_ident()
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the lines kept for the loop's turn now."""
        lines, self._pending = self._pending, None
        if lines:
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        try:
            self.output.write("\n".join(lines) + "\n")
            self.output.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not take the daemon down; /logs still has the lines

    debug = info = warning = error = critical = exception = log = msg


class _Output:
    """The structlog 'logger' every bound logger holds: whichever sink `apply` set last."""

    def __init__(self) -> None:
        self.sink: _Sink | None = None

    def msg(self, line: str) -> None:
        if self.sink is not None:
            self.sink.msg(line)

    debug = info = warning = error = critical = exception = log = msg


# Bound loggers are cached on first use (assembling one per call costs a few microseconds a
# task). What a reload changes is changed in place, so cached loggers follow it: the output,
# the processor list, and the level methods of the one wrapper class they are all made of.
_OUTPUT = _Output()
_PROCESSORS: list[Any] = []
WorkerLogger: type[Any] = type(
    "WorkerLogger", (structlog.make_filtering_bound_logger(logging.DEBUG),), {}
)


_LEVEL = [logging.DEBUG]  # the level in force, for `emit`


def set_level(level: int) -> None:
    """Make every bound logger, cached or not, filter at `level`: below it a call is a no-op."""
    for name, attr in vars(structlog.make_filtering_bound_logger(level)).items():
        if not name.startswith("__"):
            setattr(WorkerLogger, name, attr)
    _LEVEL[0] = level


def enabled(level: int) -> bool:
    return level >= _LEVEL[0]


_METHODS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}
_METHODS |= {logging.ERROR: "error", logging.CRITICAL: "critical"}


def emit(level: int, event: str, fields: dict[str, Any]) -> None:
    """Write `fields` as the line `structlog.get_logger().log(level, event, **fields)` writes
    (same keys, same order), taking `fields` as the event dict. The json format renders it in
    one step, skipping structlog's per-call copies and dispatch: the task summary line is
    written for every task. Other formats, and a test's `capture_logs`, go through structlog."""
    if level < _LEVEL[0]:
        return
    if len(_PROCESSORS) != 1 or type(_PROCESSORS[0]) is not JsonLine:
        structlog.get_logger("worker.tasks").log(level, event, **fields)
        return
    fields["event"] = event
    line = _PROCESSORS[0].render(_OUTPUT, _METHODS.get(level, "info"), fields)
    sink = _OUTPUT.sink
    if sink is not None:
        sink.msg(line)


def journal_stream_is(output: TextIO, environ: Mapping[str, str]) -> bool:
    """True when `output` is the stream journald connected ($JOURNAL_STREAM = device:inode)."""
    expected = environ.get("JOURNAL_STREAM", "")
    if ":" not in expected:
        return False
    try:
        stat = os.fstat(output.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def resolve_format(fmt: str, output: TextIO, environ: Mapping[str, str]) -> str:
    """`auto` becomes journal under journald, console on a terminal, json otherwise."""
    if fmt != "auto":
        return fmt
    if journal_stream_is(output, environ):
        return "journal"
    return "console" if output.isatty() else "json"


class _UtcStamp:
    """The time as `TimeStamper(fmt="iso", utc=True)` writes it, `2026-11-29T19:03:18.123456Z`
    (no fraction when it is zero, as `isoformat` does), with the date and time text made once
    a second instead of a datetime per line."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        ns = time.time_ns()
        second, micros = ns // 1_000_000_000, ns // 1000 % 1_000_000
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._text}.{micros:06d}Z" if micros else f"{self._text}Z"


class JsonLine:
    """The json format's whole processor chain as one step, writing what merge_contextvars,
    add_log_level, TimeStamper(iso, utc), StackInfoRenderer, format_exc_info and JSONRenderer
    would, in the same key order: one call and one orjson.dumps of the flat dict a line,
    where the chain made six calls and a datetime (the summary line is written per task)."""

    def __init__(self) -> None:
        self._stamp = _UtcStamp()
        self._stack = structlog.processors.StackInfoRenderer(additional_ignores=[__name__])

    def render(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        event = structlog.contextvars.merge_contextvars(logger, method, event)
        event["level"] = _LEVEL_NAMES.get(method, method)
        event["timestamp"] = self._stamp.now()
        if "stack_info" in event:
            event = self._stack(logger, method, event)
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(logger, method, event)
        return jsoncodec.dumps_log(event, default=_json_fallback)

    __call__ = render  # as structlog calls a processor; `emit` calls `render`


def _json_fallback(value: Any) -> Any:
    """What structlog's JSONRenderer writes for a value JSON has no type for."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


# structlog's add_log_level: the method name, but `warn` and `exception` are levels of their own
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}


def _journal_prefix(renderer: Any) -> Any:
    def render(logger: Any, method: str, event: Any) -> str:
        level = event.get("level", method)
        return f"<{_JOURNAL_PRIORITY.get(level, 6)}>{renderer(logger, method, event)}"

    return render


class Logging(Part):
    """The configured pipeline and the /logs buffer; `configure` may be called again."""

    name = "logging"

    def __init__(self, buffer: LogBuffer, output: TextIO | None = None) -> None:
        self.buffer = buffer
        self.sink = _Sink(output or sys.stdout, buffer)
        self.format = "console"
        self._configured: tuple[str, Mapping[str, str]] = ("console", {})

    def apply(self, new: Config) -> None:
        # The output format is read only at start-up (`logging.format` needs a restart).
        fmt, environ = self._configured
        self.buffer.resize(new.logging.max_lines)
        self.configure(new.logging.level, fmt, new.secrets(), environ)

    async def stop(self, deadline: float) -> None:
        self.sink.flush()
        self.buffer.close()

    def configure(
        self,
        level: str,
        fmt: str,
        secrets: Iterable[str],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        environ = os.environ if environ is None else environ
        self._configured = (fmt, environ)
        self.format = resolve_format(fmt, self.sink.output, environ)
        self.sink.masker = Masker(secrets)
        processors: list[Any]
        if self.format == "json":
            processors = [JsonLine()]
        else:
            processors = [
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
            ]
            if self.format != "journal":  # journald stamps every line itself
                processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
            processors += [
                structlog.processors.StackInfoRenderer(),
                structlog.processors.format_exc_info,
            ]
            if self.format == "journal":
                processors.append(_journal_prefix(structlog.dev.ConsoleRenderer(colors=False)))
            else:
                processors.append(structlog.dev.ConsoleRenderer(colors=False))
        _OUTPUT.sink = self.sink
        _PROCESSORS[:] = processors
        set_level(LEVELS[level])
        structlog.configure(
            processors=_PROCESSORS,
            wrapper_class=WorkerLogger,
            logger_factory=lambda *args: _OUTPUT,
            cache_logger_on_first_use=True,
        )
        root = logging.getLogger()
        root.handlers = [_StdlibBridge()]
        root.setLevel(LEVELS[level])
        # aiohttp's access log would double the per-task summary line for every request.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class _StdlibBridge(logging.Handler):
    """Send the standard library's records (aiohttp's, asyncio's) through structlog."""

    def __init__(self) -> None:
        super().__init__()
        self.malformed = Throttle()

    def emit(self, record: logging.LogRecord) -> None:
        if _malformed_request(record, self.malformed):
            return
        logger = structlog.get_logger(record.name)
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        logger.log(record.levelno, record.getMessage(), **fields)


def _malformed_request(record: logging.LogRecord, throttle: Throttle) -> bool:
    """aiohttp logs a request it cannot parse as an error with a traceback; anyone can send
    one, so it becomes a warning without traceback, one a second per remote address."""
    failure = record.exc_info[1] if record.exc_info else None
    if record.name != "aiohttp.server" or not isinstance(failure, HttpProcessingError):
        return False
    peer = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "unknown"
    suppressed = throttle.allow(peer)
    if suppressed is not None:
        reason = (failure.message or type(failure).__name__)[:200]
        log = structlog.get_logger("worker.http")
        log.warning("malformed request", peer=peer, reason=reason, suppressed=suppressed)
    return True
