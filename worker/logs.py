"""Logging: one structlog pipeline that writes each line to the output and to the /logs buffer.

Secrets are masked in the rendered line, the last step before it leaves the process, so no
processor, renderer or library can leak one. The standard library's records (aiohttp's) are
routed through the same pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

import structlog

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
# An Authorization or x-lb-auth value, whoever renders one (a library, a function's own log).
_CREDENTIAL = re.compile(
    r"(?i)(authorization|x-lb-auth)(\s*[\"']?\s*[:=]\s*[\"']?\s*)((?:bearer|basic)\s+)?"
    r"[^\s\"',;}\]]+"
)


def mask_credentials(line: str) -> str:
    """`Authorization: <value>` -> `Authorization: ***`, in any quoting."""
    if "auth" not in line.lower():
        return line
    return _CREDENTIAL.sub(lambda m: f"{m[1]}{m[2]}{m[3] or ''}{MASK}", line)


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
    """The structlog 'logger': masks, writes the line, and keeps it for /logs."""

    def __init__(self, output: TextIO, buffer: LogBuffer) -> None:
        self.output = output
        self.buffer = buffer
        self.secrets: tuple[str, ...] = ()
        self._flush_pending = False

    def msg(self, line: str) -> None:
        for secret in self.secrets:
            if secret in line:
                line = line.replace(secret, MASK)
        line = mask_credentials(line)
        try:
            self.output.write(line + "\n")
        except (OSError, ValueError):
            pass  # a closed stdout must not take the daemon down; /logs still has the line
        else:
            self._flush_soon()
        self.buffer.append(line)

    def _flush_soon(self) -> None:
        """Flush once the event loop has run what is ready (one write for the lines of many
        tasks under load, not one each); at once outside the loop (threads, startup)."""
        if self._flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush()
            return
        self._flush_pending = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        with contextlib.suppress(OSError, ValueError):
            self.output.flush()

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


def set_level(level: int) -> None:
    """Make every bound logger, cached or not, filter at `level`: below it a call is a no-op."""
    for name, attr in vars(structlog.make_filtering_bound_logger(level)).items():
        if not name.startswith("__"):
            setattr(WorkerLogger, name, attr)


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
        # Longest first, so a secret containing another is masked whole.
        self.sink.secrets = tuple(sorted(set(secrets), key=len, reverse=True))
        processors: list[Any] = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
        ]
        if self.format != "journal":  # journald stamps every line itself
            processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
        processors += [
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
        ]
        if self.format == "json":
            processors.append(structlog.processors.JSONRenderer(serializer=jsoncodec.dumps_log))
        elif self.format == "journal":
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

    def emit(self, record: logging.LogRecord) -> None:
        logger = structlog.get_logger(record.name)
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        logger.log(record.levelno, record.getMessage(), **fields)
