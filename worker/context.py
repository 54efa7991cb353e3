"""What a running function is told about its task."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol

Mode = Literal["sync", "stream", "webhook"]
_NO_SERVICES: Mapping[str, Any] = MappingProxyType({})


class StreamWriter(Protocol):
    """`ctx.stream`: `await ctx.stream(chunk)` sends one chunk to the client now."""

    async def __call__(self, chunk: Any) -> None: ...

    @property
    def began(self) -> bool:
        """True once output may have reached the client (the call is then never retried)."""
        ...


@dataclass(frozen=True)
class TaskContext:
    """Passed to every function as `ctx`; `stream` is set only in mode "stream"."""

    task_id: str
    function: str
    priority: int
    mode: Mode
    stream: StreamWriter | None
    log: Any  # a structlog BoundLogger carrying task_id and function
    # The started services' values by name (`@service`), as they are now.
    services: Mapping[str, Any] = field(default_factory=lambda: _NO_SERVICES)


@dataclass(frozen=True)
class ServiceContext:
    """Passed to every service as `ctx`."""

    name: str
    log: Any  # a structlog BoundLogger carrying the service's name
