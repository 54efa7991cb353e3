"""Mode webhook: the task is accepted at once and its result POSTed to the caller's URL.

A delivery starts when the function ends (its slot is already free by then) and runs apart from
the task, through one shared client session, retrying on connection errors, timeouts, 408, 429
and 5xx with exponential back-off. Pending deliveries are tracked so that the drain on shutdown
can wait for them, and bounded (`webhook.max_pending`). Every attempt connects only where the
target policy (worker/targets.py) allows, checked on the address actually connected to. Every
attempt and the final outcome are logged with the target's scheme, host, port and path; header
values, queries, fragments and userinfo never are.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDict
from yarl import URL

from worker import __version__
from worker.config import Config, WebhookSection
from worker.errors import Unavailable
from worker.jsoncodec import NotJSON, dumps_result
from worker.outcomes import Outcome
from worker.parts import Part
from worker.responses import json_response
from worker.targets import (
    TargetPolicy,
    TargetRefused,
    header_target_matches,
    loggable,
    scrub,
)
from worker.tasks import Dispatcher, Job, TaskResult, TaskSpec

_log = structlog.get_logger("worker.webhooks")

MAX_RETRY_AFTER = 60.0  # seconds; a receiver's Retry-After longer than this is not honoured


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one POST went: delivered, or why not and whether to try again."""

    delivered: bool
    retry: bool
    status: int | None = None
    error: str | None = None
    retry_after: float = 0.0


def payload(spec: TaskSpec, result: TaskResult, limit: int) -> bytes:
    """The body POSTed for a finished task, exactly as signed and sent: the result, or why it
    cannot be delivered (not JSON, or larger than `limit` bytes once encoded)."""
    body: dict[str, Any] = {"task_id": spec.task_id, "function": spec.function.name}
    if result.outcome is Outcome.SUCCEEDED:
        try:
            encoded = dumps_result({**body, "success": True, "result": result.value}).encode()
        except NotJSON as exc:
            error = str(exc)
        else:
            if len(encoded) <= limit:
                return encoded
            error = (
                f"Function result is larger than webhook.max_result_bytes ({limit} bytes): "
                f"{len(encoded)} bytes encoded"
            )
    else:
        error = result.error or result.outcome.value
    return failure(spec, error)


def failure(spec: TaskSpec, error: str) -> bytes:
    """The body of a task whose result is not delivered, saying why."""
    body = {"task_id": spec.task_id, "function": spec.function.name}
    return json.dumps({**body, "success": False, "error": error}).encode()


def signature(secret: str, body: bytes) -> str:
    """The `X-Signature-256` value: HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def attempt_headers(
    headers: CIMultiDict[str], body: bytes, secret: str, attempt: int, now: float
) -> CIMultiDict[str]:
    """The headers of one attempt: its number, when it was sent, and, with a secret, the
    signature of "<timestamp>.<body>", so that a receiver can refuse a replayed request."""
    stamped = headers.copy()
    timestamp = str(int(now))
    stamped["X-Webhook-Attempt"] = str(attempt)
    stamped["X-Webhook-Timestamp"] = timestamp
    if secret:
        signed = timestamp.encode() + b"." + body
        digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        stamped["X-Webhook-Signature"] = f"t={timestamp},v1={digest}"
    return stamped


def request_headers(spec: TaskSpec, body: bytes, settings: WebhookSection) -> CIMultiDict[str]:
    """Configured headers (only to `header_targets`, when set), overridden by the request's
    own; the worker's own headers last."""
    headers: CIMultiDict[str] = CIMultiDict({"User-Agent": f"base-worker/{__version__}"})
    assert spec.webhook is not None
    url = spec.webhook.url
    configured: Mapping[str, str] = settings.headers
    if settings.header_targets and not any(
        header_target_matches(url, prefix) for prefix in settings.header_targets
    ):
        configured = {}
    if URL(url).raw_user is not None:  # the URL's credentials are the task's own: they win
        configured = {k: v for k, v in configured.items() if k.lower() != "authorization"}
    for source in (configured, spec.webhook.headers):
        for name, value in source.items():
            headers[name] = value  # replaces case-insensitively
    headers["Content-Type"] = "application/json"
    headers["X-Task-Id"] = spec.task_id
    headers.popall("X-Signature-256", None)  # only the worker signs
    if settings.secret:
        headers["X-Signature-256"] = signature(settings.secret, body)
    return headers


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 0), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return 0.0  # an HTTP date: the back-off alone will do


STOPPING = "the worker is stopping"


class PolicyResolver(AbstractResolver):
    """The default resolver, keeping only the addresses the target policy allows: the check
    applies to the very addresses connected to, at every attempt (the DNS cache is off), so
    a name that resolves elsewhere the second time (DNS rebinding) is checked again."""

    def __init__(
        self, policy: Callable[[], TargetPolicy], inner: AbstractResolver | None = None
    ) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        policy = self._policy()
        allowed: list[ResolveResult] = []
        refusals: list[str] = []
        for result in found:
            address = ipaddress.ip_address(result["host"].split("%", 1)[0])
            refusal = policy.refusal(address, port, host)
            if refusal is None:
                allowed.append(result)
            else:
                refusals.append(refusal)
        if not allowed:
            raise TargetRefused(refusals[0] if refusals else f"{host} has no address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class Deliveries(Part):
    """Every webhook result not yet delivered, and the client session that delivers them."""

    name = "webhook deliveries"

    def __init__(
        self,
        settings: WebhookSection,
        own_ports: Callable[[], Iterable[int]] = frozenset,
        on_outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        # Read at the start of each delivery, so a reload applies to the next ones.
        self._settings = settings
        self._own_ports = own_ports
        # Told "delivered", "retried" (another attempt follows) or "failed" (the metrics).
        self._on_outcome = on_outcome
        self._policy: tuple[Any, TargetPolicy] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._accepted = 0  # webhook tasks queued, running or awaiting delivery
        self._idle = asyncio.Event()
        self._idle.set()
        self.delivered = 0
        self.failed = 0
        self.abandoned = 0  # results given up on because the worker stopped

    @property
    def pending(self) -> int:
        """Webhook tasks accepted and not yet delivered (or given up on)."""
        return self._accepted

    def admit(self) -> None:
        """Raise Unavailable (503) when `webhook.max_pending` webhook tasks are pending."""
        limit = self._settings.max_pending
        if self._accepted >= limit:
            raise Unavailable(
                f"Too many webhook tasks pending delivery (webhook.max_pending is {limit})"
            )

    def health(self) -> dict[str, Any]:
        return {
            "webhooks": {
                "pending": self.pending,
                "delivered": self.delivered,
                "failed": self.failed,
            }
        }

    def apply(self, new: Config) -> None:
        self._settings = new.webhook

    def policy(self) -> TargetPolicy:
        """The target policy in force (it follows reloads and the ports actually bound)."""
        settings = self._settings
        key = (settings.allow, settings.deny, frozenset(self._own_ports()))
        if self._policy is None or self._policy[0] != key:
            self._policy = (key, TargetPolicy(settings.allow, settings.deny, key[2]))
        return self._policy[1]

    async def start(self) -> None:
        # A new connection for every attempt (no pooling) so that every attempt resolves the
        # name again and checks the address it really connects to.
        connector = aiohttp.TCPConnector(
            resolver=PolicyResolver(self.policy), use_dns_cache=False, force_close=True
        )
        self._session = aiohttp.ClientSession(connector=connector)

    async def stop(self, deadline: float) -> None:
        """Deliver what is pending until `deadline`, give up on the rest (logged as
        undelivered), and close the session."""
        if self._pending:
            await asyncio.wait(self._pending, timeout=max(deadline - _now(), 0))
        self.abandon()
        if self._pending:
            await asyncio.wait(self._pending)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def follow(self, job: Job) -> None:
        """Deliver the job's result as soon as its function ends."""
        self._accepted += 1
        job.task.add_done_callback(lambda _: self._start(job))

    def abandon(self) -> int:
        """Cancel every pending delivery; returns how many results were left undelivered."""
        for delivery in self._pending:
            delivery.cancel(STOPPING)
        self.abandoned += len(self._pending)
        return len(self._pending)

    async def wait_idle(self) -> None:
        """Return once no delivery is under way."""
        await self._idle.wait()

    def _start(self, job: Job) -> None:
        # Encoded here, once: from now on only the bytes are kept, not the result's value.
        spec = job.spec
        try:
            body = payload(spec, job.finished(), self._settings.max_result_bytes)
        except Exception as exc:  # a bug must not lose the task: deliver the failure instead
            body = failure(spec, f"internal error: {type(exc).__name__}")
        delivery = asyncio.get_running_loop().create_task(self._deliver(spec, body))
        self._pending.add(delivery)
        self._idle.clear()
        delivery.add_done_callback(self._forget)

    def _forget(self, delivery: asyncio.Task[None]) -> None:
        self._pending.discard(delivery)
        self._accepted -= 1
        if not self._pending:
            self._idle.set()

    async def _deliver(self, spec: TaskSpec, body: bytes) -> None:
        assert spec.webhook is not None
        settings = self._settings
        url = spec.webhook.url
        attempts = 1 + settings.max_retries
        log = _log.bind(task_id=spec.task_id, function=spec.function.name, target=loggable(url))
        attempt = 0
        try:
            headers = request_headers(spec, body, settings)
            for attempt in range(1, attempts + 1):
                began = time.monotonic()
                # aiohttp does not call the resolver for an IP literal: check it here.
                refusal = self.policy().refusal_of_url(url)
                if refusal is not None:
                    outcome = Attempt(False, False, error=f"refused: {refusal}")
                else:
                    sent = attempt_headers(headers, body, settings.secret, attempt, time.time())
                    outcome = await self._post(url, body, sent, settings.timeout)
                fields: dict[str, Any] = {
                    "attempt": attempt,
                    "of": attempts,
                    "status": outcome.status,
                    "elapsed_ms": round((time.monotonic() - began) * 1000, 2),
                }
                if outcome.delivered:
                    log.info("webhook attempt", **fields)
                    self.delivered += 1
                    self._on_outcome("delivered")
                    log.info("webhook delivered", attempts=attempt)
                    return
                error = scrub(outcome.error or "", url)  # aiohttp's texts may quote the URL
                log.warning("webhook attempt failed", **fields, error=error)
                if not outcome.retry or attempt == attempts:
                    break
                self._on_outcome("retried")
                # The n-th retry waits retry_delay * 2^(n-1), or longer if the receiver asks.
                delay = settings.retry_delay * 2 ** (attempt - 1)
                await asyncio.sleep(max(delay, outcome.retry_after))
        except asyncio.CancelledError:
            self._undelivered()
            log.warning("webhook undelivered", attempts=attempt, error=STOPPING)
            raise
        except Exception as exc:  # whatever happens, the task ends counted and logged
            self._undelivered()
            log.error("webhook undelivered", attempts=attempt, error=_internal(exc))
            return
        self._undelivered()
        log.warning("webhook undelivered", attempts=attempt, error=error)

    def _undelivered(self) -> None:
        self.failed += 1
        self._on_outcome("failed")

    async def _post(
        self, url: str, body: bytes, headers: CIMultiDict[str], seconds: float
    ) -> Attempt:
        if self._session is None:
            return Attempt(False, False, error=STOPPING)
        try:
            async with self._session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=seconds),
                allow_redirects=False,
            ) as answer:
                status = answer.status
                retry_after = _retry_after(answer.headers.get("Retry-After"))
        except TimeoutError:
            return Attempt(False, True, error=f"no answer within {seconds:g}s")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, TargetRefused):
                return Attempt(False, False, error=f"refused: {exc.os_error}")
            return Attempt(False, True, error=f"{type(exc).__name__}: {exc}")
        except aiohttp.ClientError as exc:
            return Attempt(False, True, error=f"{type(exc).__name__}: {exc}")
        except ValueError:
            # aiohttp refuses a malformed header or URL; its message may quote the value.
            return Attempt(False, False, error="invalid webhook URL or header")
        if 200 <= status < 300:
            return Attempt(True, False, status)
        retry = status in (408, 429) or status >= 500
        return Attempt(False, retry, status, f"HTTP {status}", retry_after)


def _internal(exc: Exception) -> str:
    # Only the type: the text of an exception raised while sending may quote the URL.
    return f"internal error: {type(exc).__name__}"


def _now() -> float:
    return asyncio.get_running_loop().time()


class WebhookMode:
    """Mode webhook: 202 as soon as the task is accepted; the result follows by POST."""

    def __init__(self, dispatcher: Dispatcher, deliveries: Deliveries) -> None:
        self._dispatcher = dispatcher
        self._deliveries = deliveries

    async def __call__(self, request: web.Request, spec: TaskSpec) -> web.StreamResponse:
        self._deliveries.admit()
        job = self._dispatcher.submit(spec)
        self._deliveries.follow(job)
        body = {
            "success": True,
            "task_id": spec.task_id,
            "message": "Task accepted; its result will be POSTed to the webhook URL",
        }
        return json_response(body, 202, {"X-Task-Id": spec.task_id})
