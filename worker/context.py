"""What a running function is told about its task."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol

import structlog

Mode = Literal["sync", "stream", "webhook"]
_NO_SERVICES: Mapping[str, Any] = MappingProxyType({})


class StreamWriter(Protocol):
    """`ctx.stream`: `await ctx.stream(chunk)` sends one chunk to the client now."""

    async def __call__(self, chunk: Any) -> None: ...

    async def send_each(self, chunks: AsyncIterator[Any]) -> None:
        """Send each chunk `chunks` yields, in order (the runner drains a streaming function
        through it)."""
        ...

    @property
    def began(self) -> bool:
        """True once output may have reached the client (the call is then never retried)."""
        ...


class TaskContext:
    """Passed to every function as `ctx`; `stream` is set only in mode "stream"."""

    __slots__ = ("_log", "function", "mode", "priority", "services", "stream", "task_id")

    def __init__(
        self,
        task_id: str,
        function: str,
        priority: int,
        mode: Mode,
        stream: StreamWriter | None,
        log: Any = None,
        services: Mapping[str, Any] = _NO_SERVICES,
    ) -> None:
        self.task_id = task_id
        self.function = function
        self.priority = priority
        self.mode = mode
        self.stream = stream
        self._log = log
        # The started services' values by name (`@service`), as they are now.
        self.services = services

    @property
    def log(self) -> Any:
        """A structlog BoundLogger carrying task_id and function; bound at first use (most
        functions never log, and binding costs every task)."""
        if self._log is None:
            self._log = structlog.get_logger("worker.tasks").bind(
                task_id=self.task_id, function=self.function
            )
        return self._log

    def __repr__(self) -> str:
        return (
            f"TaskContext(task_id={self.task_id!r}, function={self.function!r}, mode={self.mode!r})"
        )


@dataclass(frozen=True)
class ServiceContext:
    """Passed to every service as `ctx`."""

    name: str
    log: Any  # a structlog BoundLogger carrying the service's name
