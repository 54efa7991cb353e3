"""User functions and tags: the decorators, and loading them from modules, files and directories.

The decorators only mark a callable; nothing is registered at import time. Loading imports each
configured source and collects the marked callables into a Registry, which is where duplicate
names and bad params declarations are caught.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar, overload

from marshmallow import Schema

from worker.params import ParamsError, compile_params

_FUNCTION_MARK = "__base_worker_function__"
_TAG_MARK = "__base_worker_tag__"
_SERVICE_MARK = "__base_worker_service__"

Kind = Literal["async", "thread", "generator"]
F = TypeVar("F", bound=Callable[..., Any])


class LoadError(Exception):
    """A function source could not be loaded; the message is one line."""


@dataclass(frozen=True)
class FunctionSpec:
    """One callable function, as declared by its decorator."""

    name: str
    handler: Callable[..., Any]
    kind: Kind
    params: Mapping[str, Mapping[str, Any]]
    schema: Schema = field(repr=False, compare=False)
    streaming: bool = False
    timeout: float | None = None
    max_retries: int = 0
    log_result: bool = True
    idempotent: bool = False  # safe to run again after a crash cut it short

    def describe(self) -> dict[str, Any]:
        """The `{"name", "params"}` form that /health and load balancers read."""
        return {"name": self.name, "params": {k: dict(v) for k, v in self.params.items()}}


@dataclass(frozen=True)
class TagSpec:
    """A named piece of metadata computed each time the detailed /health is asked for."""

    name: str
    compute: Callable[[], Any]


@dataclass(frozen=True)
class ServiceSpec:
    """A long-lived helper (Andera's defineService): an async generator with one `yield`.

    Before the `yield` it starts (what it yields is its status and what `ctx.services[name]`
    gives functions); after it, it stops.
    """

    name: str
    factory: Callable[[Any], AsyncGenerator[Any, None]]
    restart_on_failure: bool = False


def _kind_of(handler: Callable[..., Any]) -> Kind:
    if inspect.isasyncgenfunction(handler):
        return "generator"
    if inspect.iscoroutinefunction(handler):
        return "async"
    return "thread"


@overload
def function(handler: F) -> F: ...


@overload
def function(
    *,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    streaming: bool = False,
    timeout: float | None = None,
    max_retries: int = 0,
    log_result: bool = True,
    name: str | None = None,
    idempotent: bool = False,
) -> Callable[[F], F]: ...


def function(
    handler: F | None = None,
    *,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    streaming: bool = False,
    timeout: float | None = None,
    max_retries: int = 0,
    log_result: bool = True,
    name: str | None = None,
    idempotent: bool = False,
) -> Any:
    """Mark `handler(params, ctx)` as a function the worker serves (usable bare or with options)."""

    def mark(target: F) -> F:
        if timeout is not None and timeout <= 0:
            raise ParamsError(f"function {target.__name__}: timeout must be positive")
        if max_retries < 0:
            raise ParamsError(f"function {target.__name__}: max_retries must be >= 0")
        declared = dict(params or {})
        spec = FunctionSpec(
            name=name or target.__name__,
            handler=target,
            kind=_kind_of(target),
            params=declared,
            schema=compile_params(name or target.__name__, declared),
            streaming=streaming,
            timeout=timeout,
            max_retries=max_retries,
            log_result=log_result,
            idempotent=idempotent,
        )
        setattr(target, _FUNCTION_MARK, spec)
        return target

    return mark(handler) if handler is not None else mark


def service(
    handler: F | None = None, *, name: str | None = None, restart_on_failure: bool = False
) -> Any:
    """Mark `factory(ctx)`, an async generator with one `yield`, as a service that starts before
    the worker serves and stops after it drained (usable bare or with options)."""

    def mark(factory: F) -> F:
        if not inspect.isasyncgenfunction(factory):
            raise ParamsError(
                f"service {factory.__name__}: must be an async generator (async def with yield)"
            )
        spec = ServiceSpec(name or factory.__name__, factory, restart_on_failure)
        setattr(factory, _SERVICE_MARK, spec)
        return factory

    return mark(handler) if handler is not None else mark


def tag(name: str) -> Callable[[F], F]:
    """Mark a no-argument callable (plain or async) whose value appears under /health `tags`."""

    def mark(compute: F) -> F:
        setattr(compute, _TAG_MARK, TagSpec(name, compute))
        return compute

    return mark


@dataclass(frozen=True)
class Registry:
    """The functions, tags and services loaded at startup, by name (services in the order
    they were declared)."""

    functions: Mapping[str, FunctionSpec]
    tags: Mapping[str, TagSpec]
    services: Mapping[str, ServiceSpec] = field(default_factory=dict)

    def get(self, name: str) -> FunctionSpec | None:
        return self.functions.get(name)

    def describe(self) -> list[dict[str, Any]]:
        return [spec.describe() for spec in self.functions.values()]

    async def compute_tags(self) -> dict[str, Any]:
        """Each tag's current value; a tag that raises shows its error instead of hiding."""
        values: dict[str, Any] = {}
        for tag_spec in self.tags.values():
            try:
                value = tag_spec.compute()
                values[tag_spec.name] = await value if inspect.isawaitable(value) else value
            except Exception as exc:
                values[tag_spec.name] = f"error: {exc}"
        return values


def _import_file(path: Path) -> ModuleType:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    module_name = f"base_worker_functions.{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _modules_of(source: str) -> Iterable[ModuleType]:
    path = Path(source)
    if source.endswith(".py"):
        if not path.is_file():
            raise LoadError(f"function file {source} does not exist")
        yield _import_file(path)
    elif path.is_dir():
        for child in sorted(path.glob("*.py")):
            if not child.name.startswith("_"):
                yield _import_file(child)
    elif "/" in source:
        raise LoadError(f"function directory {source} does not exist")
    else:
        yield importlib.import_module(source)


def load(sources: Iterable[str]) -> Registry:
    """Import every source and collect its functions and tags; any problem is a LoadError."""
    functions: dict[str, FunctionSpec] = {}
    origins: dict[str, str] = {}
    tags: dict[str, TagSpec] = {}
    services: dict[str, ServiceSpec] = {}
    for source in sources:
        try:
            modules = list(_modules_of(source))
        except LoadError:
            raise
        except ParamsError as exc:
            raise LoadError(f"functions in {source}: {exc}") from None
        except Exception as exc:
            raise LoadError(f"cannot import {source}: {type(exc).__name__}: {exc}") from None
        for module in modules:
            for value in vars(module).values():
                spec = getattr(value, _FUNCTION_MARK, None)
                if isinstance(spec, FunctionSpec):
                    existing = functions.get(spec.name)
                    if existing is not None and existing.handler is not spec.handler:
                        raise LoadError(
                            f"function {spec.name!r} is defined twice "
                            f"(in {origins[spec.name]} and {module.__name__})"
                        )
                    functions[spec.name] = spec
                    origins[spec.name] = module.__name__
                tag_spec = getattr(value, _TAG_MARK, None)
                if isinstance(tag_spec, TagSpec):
                    tags[tag_spec.name] = tag_spec
                service_spec = getattr(value, _SERVICE_MARK, None)
                if isinstance(service_spec, ServiceSpec):
                    known = services.get(service_spec.name)
                    if known is not None and known.factory is not service_spec.factory:
                        raise LoadError(f"service {service_spec.name!r} is defined twice")
                    services[service_spec.name] = service_spec
    if not functions:
        raise LoadError(f"no functions found in {', '.join(sources)}")
    return Registry(functions=functions, tags=tags, services=services)
