"""What a running function is told about its task."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["sync", "stream", "webhook"]
StreamWriter = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class TaskContext:
    """Passed to every function as `ctx`; `stream` is set only in mode "stream"."""

    task_id: str
    function: str
    priority: int
    mode: Mode
    stream: StreamWriter | None
    log: Any  # a structlog BoundLogger carrying task_id and function
