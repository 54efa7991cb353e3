"""Example functions shipped with the package; `config.example.toml` serves these."""

from __future__ import annotations

import platform
from typing import Any

from worker import function, tag
from worker.context import TaskContext


@function(
    params={"name": {"type": "string", "required": False, "default": "World"}},
    streaming=True,
    timeout=5.0,
)
async def hello(params: dict[str, Any], ctx: TaskContext) -> dict[str, str] | None:
    if ctx.stream:
        await ctx.stream(f"Hello {params['name']}!")
        return None
    return {"message": f"Hello {params['name']}!"}


@tag("python")
def python_version() -> str:
    return platform.python_version()
