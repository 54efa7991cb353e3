"""Mode webhook: the task is accepted at once and its result POSTed to the caller's URL.

A delivery starts when the function ends (its slot is already free by then) and runs apart from
the task, through one shared client session, retrying on connection errors, timeouts, 408, 429
and 5xx with exponential back-off. Pending deliveries are tracked so that the drain on shutdown
can wait for them, and bounded (`webhook.max_pending`). Connections are kept alive and reused;
each one is made only where the target policy (worker/targets.py) allows, checked on the
address actually connected to, and none outlives the policy it was checked under. Every
attempt and the final outcome are logged with the target's scheme, host, port and path; header
values, queries, fragments and userinfo never are.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import Connection
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDict
from yarl import URL

from worker import __version__, logs
from worker.config import Config, WebhookSection
from worker.errors import BadRequest, Unavailable
from worker.functions import Registry
from worker.giveway import GiveWay
from worker.journal import Entry, Journal, JournalUnavailable
from worker.jsoncodec import NotJSON, dumps_answer, dumps_success
from worker.outcomes import SUCCEEDED, Reason
from worker.parts import Part, Waiters
from worker.responses import json_response
from worker.targets import (
    TargetPolicy,
    TargetRefused,
    header_target_matches,
    loggable,
    scrub,
)
from worker.tasks import Dispatcher, Job, TaskResult, TaskSpec, WebhookTarget

_log = structlog.get_logger("worker.webhooks")

MAX_RETRY_AFTER = 60.0  # seconds; a receiver's Retry-After longer than this is not honoured
# Idle delivery connections are closed after this, before common receivers close them (gunicorn
# after 2 s, Node after 5 s): fewer reuses race a receiver's own close.
KEEPALIVE_TIMEOUT = 1.5
MAX_RESENDS = 2  # re-sends within one attempt when a reused connection turned out closed
# A result's first attempt gives way while webhook tasks keep arriving and the CPU busy
# (worker/giveway.py), looking again every GIVE_WAY_PAUSE, for GIVE_WAY_LONGEST at most. A look
# that finds no arrival since the one before ends the wait: on a machine whose cores are shared,
# the clients' own processes are off the CPU for 10 ms now and then (bench (d) beside a spinning
# process: 7-11 such looks a burst at 10 ms, none in nine bursts at 30).
GIVE_WAY_PAUSE = 0.03
GIVE_WAY_LONGEST = 1.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one POST went: delivered, or why not and whether to try again."""

    delivered: bool
    retry: bool
    status: int | None = None
    error: str | None = None
    retry_after: float = 0.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where one task's result goes, under which id: from a task now, or from the journal."""

    task_id: str
    function: str
    webhook: WebhookTarget

    @classmethod
    def of(cls, spec: TaskSpec) -> Delivery:
        assert spec.webhook is not None
        return cls(spec.task_id, spec.function.name, spec.webhook)

    @classmethod
    def of_entry(cls, entry: Entry) -> Delivery:
        return cls(entry.task_id, entry.function, WebhookTarget(entry.url, entry.headers))


def payload(spec: TaskSpec, result: TaskResult, limit: int) -> bytes:
    """The body POSTed for a finished task, exactly as signed and sent: the result, or why it
    cannot be delivered (not JSON, or larger than `limit` bytes once encoded)."""
    if result.outcome is SUCCEEDED:
        try:
            encoded = dumps_success(result.value, task_id=spec.task_id, function=spec.function.name)
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
    return failure(spec.task_id, spec.function.name, error)


def failure(task_id: str, function: str, error: str) -> bytes:
    """The body of a task whose result is not delivered, saying why."""
    return dumps_answer(
        {"task_id": task_id, "function": function, "success": False, "error": error}
    )


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


def request_headers(delivery: Delivery, body: bytes, settings: WebhookSection) -> CIMultiDict[str]:
    """Configured headers (only to `header_targets`, when set), overridden by the request's
    own; the worker's own headers last."""
    headers: CIMultiDict[str] = CIMultiDict({"User-Agent": f"base-worker/{__version__}"})
    url = delivery.webhook.url
    configured: Mapping[str, str] = settings.headers
    if settings.header_targets and not any(
        header_target_matches(url, prefix) for prefix in settings.header_targets
    ):
        configured = {}
    if URL(url).raw_user is not None:  # the URL's credentials are the task's own: they win
        configured = {k: v for k, v in configured.items() if k.lower() != "authorization"}
    for source in (configured, delivery.webhook.headers):
        for name, value in source.items():
            headers[name] = value  # replaces case-insensitively
    headers["Content-Type"] = "application/json"
    headers["X-Task-Id"] = delivery.task_id
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
    applies to the very addresses connected to, at every new connection (the DNS cache is
    off), so a name that resolves elsewhere the second time (DNS rebinding) is checked again."""

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
        journal: Journal,
        own_ports: Callable[[], Iterable[int]] = frozenset,
        on_outcome: Callable[[str], None] = lambda outcome: None,
        give_way: GiveWay | None = None,
    ) -> None:
        # Read at the start of each delivery, so a reload applies to the next ones.
        self._settings = settings
        self._journal = journal
        self._own_ports = own_ports
        # Told "delivered", "retried" (another attempt follows) or "failed" (the metrics).
        self._on_outcome = on_outcome
        # When a result's first attempt goes: at once, or once a burst of arrivals eases.
        self.give_way = (
            give_way if give_way is not None else GiveWay(GIVE_WAY_PAUSE, GIVE_WAY_LONGEST)
        )
        self._policy: tuple[Any, TargetPolicy] | None = None
        self._pool: _Pool | None = None
        self._retired: list[_Pool] = []  # older policies' pools, closed once idle
        self._closers: set[asyncio.Task[None]] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._accepted = 0  # webhook tasks queued, running or awaiting delivery
        self._idle = Waiters()  # told when no delivery is under way or held (a drain)
        self.delivered = 0
        self.failed = 0
        self.abandoned = 0  # results given up on because the worker stopped
        self._held = 0  # first attempts giving way, not yet in _pending

    @property
    def pending(self) -> int:
        """Webhook tasks accepted and not yet delivered (or given up on)."""
        return self._accepted

    def admit(self) -> None:
        """Raise Unavailable (503) when `webhook.max_pending` webhook tasks are pending. A task
        let in makes first attempts give way to arrivals a little longer; a refused one does
        not, so that the pending drain."""
        limit = self._settings.max_pending
        if self._accepted >= limit:
            raise Unavailable(
                f"Too many webhook tasks pending delivery (webhook.max_pending is {limit})"
            )
        self.give_way.arrived()

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
        self._pool = self._open_pool(self.policy())

    async def stop(self, deadline: float) -> None:
        """Deliver what is pending until `deadline`, give up on the rest (logged as
        undelivered), and close the sessions."""
        self.give_way.release()  # no task arrives any more
        if self._pending:
            await asyncio.wait(self._pending, timeout=max(deadline - _now(), 0))
        self.abandon()
        if self._pending:
            await asyncio.wait(self._pending)
        pools, self._pool = [*self._retired, self._pool], None
        self._retired.clear()
        for pool in pools:
            if pool is not None:
                await pool.session.close()
        if self._closers:
            await asyncio.wait(self._closers)

    def _open_pool(self, policy: TargetPolicy) -> _Pool:
        # Keep-alive connections, one pool per policy: a connection is made only through the
        # policy resolver (no DNS cache, so every new connection resolves again and checks the
        # address it connects to), and a policy change (a reload, the ports bound) starts a
        # new pool, so no connection checked under an older policy carries another attempt.
        connector = _Connector(
            resolver=PolicyResolver(lambda: policy),
            use_dns_cache=False,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
        )
        # No cookie jar: deliveries of different clients' tasks share this session, and a
        # cookie one receiver set must not go out with the next delivery to its host.
        session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        return _Pool(session, policy)

    def _current_pool(self) -> _Pool | None:
        pool = self._pool
        if pool is None:
            return None
        policy = self.policy()
        if pool.policy is not policy:
            self._retire(pool)
            pool = self._pool = self._open_pool(policy)
        return pool

    def _retire(self, pool: _Pool) -> None:
        """Close an older policy's pool once the requests still on it have ended."""
        if pool.in_flight:
            self._retired.append(pool)
        else:
            self._closing(pool)

    def _closing(self, pool: _Pool) -> None:
        task = asyncio.get_running_loop().create_task(pool.session.close())
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    def follow(self, job: Job) -> None:
        """Deliver the job's result as soon as its function ends."""
        self._accepted += 1
        job.on_end.append(self._start)

    def resend(self, delivery: Delivery, body: bytes, made: int, fresh: bool) -> None:
        """Deliver a body the journal kept: after a restart its attempts go on from `made`
        within the same budget; a redelivered dead letter (`fresh`) gets a new budget."""
        self._accepted += 1
        budget = 1 + self._settings.max_retries
        self._send(delivery, body, made, budget if fresh else max(budget - made, 1))

    def abandon(self) -> int:
        """Cancel every pending delivery; returns how many results were left undelivered."""
        for delivery in self._pending:
            delivery.cancel(STOPPING)
        self.abandoned += len(self._pending)
        return len(self._pending)

    async def wait_idle(self) -> None:
        """Return once no delivery is under way; what gives way to arrivals goes now (the
        drain waits here, and nothing arrives while it does)."""
        self.give_way.release()
        if self._pending or self._held:
            await self._idle.wait()

    def _start(self, job: Job) -> None:
        spec = job.spec
        if job.reason is Reason.KEPT:  # not run: the journal keeps it for the next start
            self._accepted -= 1
            return
        # Encoded here, once: from now on only the bytes are kept, not the result's value.
        try:
            body = payload(spec, job.finished(), self._settings.max_result_bytes)
        except Exception as exc:  # a bug must not lose the task: deliver the failure instead
            body = failure(spec.task_id, spec.function.name, _internal(exc))
        self._journal.done(spec.task_id, body)
        delivery, budget = Delivery.of(spec), 1 + self._settings.max_retries
        # Held as a call, not a task: a burst's deliveries cost nothing until they go.
        self._held += 1
        self.give_way.call(lambda: self._go(delivery, body, budget))

    def _go(self, delivery: Delivery, body: bytes, budget: int) -> None:
        self._held -= 1
        self._send(delivery, body, 0, budget)

    def _send(self, delivery: Delivery, body: bytes, made: int, budget: int) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(delivery, body, made, budget))
        self._pending.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, delivery: asyncio.Task[None]) -> None:
        self._pending.discard(delivery)
        self._accepted -= 1
        if not self._pending and not self._held and self._idle.futures:
            self._idle.wake()

    async def _deliver(self, delivery: Delivery, body: bytes, made: int, budget: int) -> None:
        """Attempts made+1 .. made+budget; delivered, or a dead letter (the journal keeps it);
        cut short by a stop, the journal keeps it for the next start."""
        settings = self._settings
        task_id, url = delivery.task_id, delivery.webhook.url
        last = made + budget
        about = {"task_id": task_id, "function": delivery.function, "target": loggable(url)}
        attempt = made
        error = ""
        try:
            if self._journal.durable:
                # Nothing goes out before the journal holds the result: a kill between a
                # receiver's 2xx and the result's commit would send the task again as
                # interrupted, a second and different answer for one task.
                with contextlib.suppress(JournalUnavailable):  # then it goes out all the same
                    await self._journal.committed()
            headers = request_headers(delivery, body, settings)
            for attempt in range(made + 1, last + 1):
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
                    "of": last,
                    "status": outcome.status,
                    "elapsed_ms": round((time.monotonic() - began) * 1000, 2),
                }
                if outcome.delivered:
                    self.delivered += 1
                    self._on_outcome("delivered")
                    self._journal.delivered(task_id)
                    # The last attempt and the outcome in one line; failed attempts have theirs.
                    logs.emit(
                        logging.INFO, "webhook delivered", {**about, **fields, "attempts": attempt}
                    )
                    return
                error = scrub(outcome.error or "", url)  # aiohttp's texts may quote the URL
                _log.warning("webhook attempt failed", **about, **fields, error=error)
                self._journal.attempted(task_id, attempt, error)
                if not outcome.retry or attempt == last:
                    break
                self._on_outcome("retried")
                # The n-th retry waits retry_delay * 2^(n-1), or longer if the receiver asks.
                delay = settings.retry_delay * 2 ** (attempt - made - 1)
                await asyncio.sleep(max(delay, outcome.retry_after))
        except asyncio.CancelledError:
            self._undelivered()
            _log.warning("webhook undelivered", **about, attempts=attempt, error=STOPPING)
            raise
        except Exception as exc:  # whatever happens, the task ends counted and logged
            error = _internal(exc)
            self._undelivered()
            self._journal.dead(task_id, error, attempt)
            _log.error(
                "webhook undelivered", **about, attempts=attempt, error=error, dead_letter=True
            )
            return
        self._undelivered()
        self._journal.dead(task_id, error, attempt)
        _log.warning(
            "webhook undelivered", **about, attempts=attempt, error=error, dead_letter=True
        )

    def _undelivered(self) -> None:
        self.failed += 1
        self._on_outcome("failed")

    async def _post(
        self, url: str, body: bytes, headers: CIMultiDict[str], seconds: float
    ) -> Attempt:
        pool = self._current_pool()
        if pool is None:
            return Attempt(False, False, error=STOPPING)
        pool.in_flight += 1
        try:
            # A keep-alive connection the receiver closed just as it was reused fails before
            # any answer: sent again at once on another connection, within the same attempt.
            resends = 0
            while True:
                reused: list[bool] = []
                _REUSED.set(reused)
                try:
                    return await self._post_once(pool, url, body, headers, seconds)
                except _CLOSED_UNDER_US as exc:
                    connecting = isinstance(exc, aiohttp.ClientConnectorError)
                    if connecting or not reused or resends == MAX_RESENDS:
                        return self._failed_attempt(exc)
                    resends += 1
        finally:
            pool.in_flight -= 1
            if not pool.in_flight and pool in self._retired:
                self._retired.remove(pool)
                self._closing(pool)

    async def _post_once(
        self,
        pool: _Pool,
        url: str,
        body: bytes,
        headers: CIMultiDict[str],
        seconds: float,
    ) -> Attempt:
        try:
            async with pool.session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=seconds),
                allow_redirects=False,
            ) as answer:
                status = answer.status
                retry_after = _retry_after(answer.headers.get("Retry-After"))
        except _CLOSED_UNDER_US:
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            return self._failed_attempt(exc, seconds)
        if 200 <= status < 300:
            return Attempt(True, False, status)
        retry = status in (408, 429) or status >= 500
        return Attempt(False, retry, status, f"HTTP {status}", retry_after)

    @staticmethod
    def _failed_attempt(exc: BaseException, seconds: float = 0.0) -> Attempt:
        if isinstance(exc, TimeoutError):
            return Attempt(False, True, error=f"no answer within {seconds:g}s")
        if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
            exc.os_error, TargetRefused
        ):
            return Attempt(False, False, error=f"refused: {exc.os_error}")
        if isinstance(exc, aiohttp.ClientError):
            return Attempt(False, True, error=f"{type(exc).__name__}: {exc}")
        # aiohttp refuses a malformed header or URL; its message may quote the value.
        return Attempt(False, False, error="invalid webhook URL or header")


# What a connection closed by the receiver raises (a refused connect is a ClientOSError too).
_CLOSED_UNDER_US = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientConnectionResetError,
    aiohttp.ClientOSError,
)


@dataclass(slots=True, eq=False)
class _Pool:
    """One client session (its keep-alive connections) and the policy its connections were
    checked against."""

    session: aiohttp.ClientSession
    policy: TargetPolicy
    in_flight: int = 0


# Set by the delivery before its request; told by the connector when the request went out on
# a connection that had carried an earlier one (the same asyncio task runs both).
_REUSED: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("webhook_reused")


class _Connector(aiohttp.TCPConnector):
    """A TCP connector that tells the delivery whether its connection is a reused one (a
    TraceConfig would tell too, at several times the cost per request)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._used: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Connection:  # noqa: ASYNC109  (aiohttp's signature)
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        if protocol is not None:
            if protocol in self._used:
                reused = _REUSED.get(None)
                if reused is not None:
                    reused.append(True)
            else:
                self._used.add(protocol)
        return connection


def _internal(exc: Exception) -> str:
    # Only the type: the text of an exception raised while sending may quote the URL.
    return f"internal error: {type(exc).__name__}"


def _now() -> float:
    return asyncio.get_running_loop().time()


class WebhookMode(Part):
    """Mode webhook: the task is journaled, then 202; its result follows by POST. At start,
    what the journal kept from before a stop or a crash is resumed."""

    name = "webhook tasks"

    def __init__(
        self,
        dispatcher: Dispatcher,
        deliveries: Deliveries,
        journal: Journal,
        registry: Registry,
    ) -> None:
        self._dispatcher = dispatcher
        self._deliveries = deliveries
        self._journal = journal
        self._registry = registry
        self._jobs: set[Job] = set()  # webhook tasks queued or running

    async def answer(self, request: web.Request, spec: TaskSpec) -> web.StreamResponse:
        key = idempotency_key(request.headers)
        self._deliveries.admit()
        # Once journaled the task runs, whether or not its client waits for the 202: the
        # listener does not cancel a handler whose client hangs up (worker/server.py).
        first = await self._accept(spec, key)
        body: dict[str, Any] = {
            "success": True,
            "task_id": first,
            "message": "Task accepted; its result will be POSTed to the webhook URL",
        }
        if first != spec.task_id:
            body["duplicate"] = True
            body["message"] = "Task already accepted with this Idempotency-Key; nothing new runs"
        return json_response(body, 202, {"X-Task-Id": first})

    async def _accept(self, spec: TaskSpec, key: str | None) -> str:
        """Journal the task, then queue it; the id of the task that will answer."""
        assert spec.webhook is not None
        entry = Entry(
            task_id=spec.task_id,
            function=spec.function.name,
            params=spec.params,
            priority=spec.priority,
            url=spec.webhook.url,
            headers=dict(spec.webhook.headers),
            idempotency_key=key,
            accepted_at=time.time(),
        )
        try:
            known = await self._journal.admit(entry)
        except JournalUnavailable:
            raise Unavailable(
                "The task journal cannot be written; the task was not accepted"
            ) from None
        if known is not None:
            return known.task_id
        try:
            self._submit(spec, promised=False)
        except Unavailable:
            self._journal.forget(spec.task_id)
            raise
        return spec.task_id

    def _submit(self, spec: TaskSpec, promised: bool) -> None:
        task_id = spec.task_id
        job = self._dispatcher.submit(
            spec, on_start=lambda: self._journal.running(task_id), promised=promised
        )
        self._jobs.add(job)
        job.on_end.append(self._jobs.discard)
        self._deliveries.follow(job)

    async def start(self) -> None:
        """Resume what the journal kept: queued tasks run, in their order; a task cut short
        runs again if its function is idempotent, else its client is told it was
        interrupted; results not yet delivered are delivered."""
        resumed: Counter[str] = Counter()
        for entry in await self._journal.resumable():
            function = self._registry.get(entry.function)
            if entry.state == "done" and entry.body is not None:
                self._deliveries.resend(Delivery.of_entry(entry), entry.body, entry.attempts, False)
            elif function is None:
                body = failure(entry.task_id, entry.function, "the function no longer exists")
                self._journal.done(entry.task_id, body)
                self._deliveries.resend(Delivery.of_entry(entry), body, entry.attempts, False)
            elif entry.state == "queued" or function.idempotent:
                spec = TaskSpec(
                    task_id=entry.task_id,
                    function=function,
                    params=entry.params,
                    priority=entry.priority,
                    mode="webhook",
                    webhook=WebhookTarget(entry.url, entry.headers),
                )
                self._submit(spec, promised=True)
            else:
                body = failure(entry.task_id, entry.function, INTERRUPTED)
                self._journal.done(entry.task_id, body)
                self._deliveries.resend(Delivery.of_entry(entry), body, entry.attempts, False)
            resumed[entry.state] += 1
        if resumed:
            _log.info("webhook tasks resumed from the journal", **resumed)

    def keep_queued(self) -> int:
        """Draining: journaled tasks that have not started stay for the next start."""
        if not self._journal.durable:
            return 0
        waiting = [job for job in self._jobs if not job.running]
        for job in waiting:
            job.cancel(Reason.KEPT)
        return len(waiting)

    async def dead_letters(self) -> list[dict[str, Any]]:
        return [
            {
                "task_id": entry.task_id,
                "function": entry.function,
                "target": loggable(entry.url),
                "error": entry.last_error,
                "attempts": entry.attempts,
                "failed_at": _iso(entry.failed_at),
            }
            for entry in await self._journal.dead_letters()
        ]

    async def redeliver(self, task_ids: list[str] | None) -> int:
        """Dead letters (all when None) delivered again, with the same X-Task-Id."""
        entries = await self._journal.redeliver(task_ids)
        for entry in entries:
            if entry.body is not None:
                self._deliveries.resend(Delivery.of_entry(entry), entry.body, entry.attempts, True)
        return len(entries)

    async def purge(self, task_ids: list[str] | None) -> int:
        return await self._journal.purge(task_ids)


INTERRUPTED = "interrupted: the worker stopped while the task ran"
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The request's `Idempotency-Key`: 1 to 255 visible ASCII characters, else a 400."""
    value = headers.get("Idempotency-Key")
    if value is None:
        return None
    if not _IDEMPOTENCY_KEY.match(value):
        raise BadRequest(
            "Invalid Idempotency-Key header",
            details={"Idempotency-Key": ["Must be 1 to 255 visible ASCII characters."]},
        )
    return value


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
