"""GET /metrics: Prometheus metrics, exposed with prometheus_client.

The task path pays for metrics on every task, so it only adds to plain counters here (a dict
entry, a bucket found by bisection): about a microsecond, where prometheus_client's own labelled
Counter and Histogram objects cost several. At a scrape a collector turns those counters into the
library's metric families, and the library writes the exposition format. Label values come from
closed sets (function names, modes, outcomes, routes, statuses), never from task ids or URLs.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from worker.parts import Part
from worker.slots import PRECEDENCE, SlotManager
from worker.tasks import TaskResult, TaskSpec

# Seconds; prometheus_client's default buckets.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
FIRST_BOUND = BUCKETS[0]
STATUSES = ("ready", *PRECEDENCE)
DELIVERY_OUTCOMES = ("delivered", "retried", "failed")

Reading = Callable[[], Any]


class Histogram:
    """Observations in fixed buckets; exported cumulatively at a scrape."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Most tasks and waits are shorter than the first bound: counted without the search.
        if value <= FIRST_BOUND:
            self.counts[0] += 1
        else:
            self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        total, cumulative = 0, []
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            total += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return cumulative


class Metrics(Part, Collector):
    """Counts what happens to tasks, requests and deliveries; a Prometheus collector."""

    name = "metrics"

    def __init__(
        self,
        slots: SlotManager,
        links: Reading,
        services: Reading,
        pending_deliveries: Reading,
        dead_letters: Reading,
        tasks_ended: Reading,
    ) -> None:
        self._slots = slots
        self._links = links  # the loadBalancer /health section
        self._services = services  # [{"name", "state", "status"}]
        self._pending = pending_deliveries
        self._dead_letters = dead_letters
        # The dispatcher's count of tasks ended, by function, mode and outcome (the outcome as
        # its member: Enum's `.value` is a Python property, read at a scrape).
        self._tasks_ended = tasks_ended
        self.durations: dict[str, Histogram] = {}
        self.queue_wait = Histogram()
        # A plain dict (`requests` reads it as a Counter): adding to a Counter, a dict
        # subclass, costs twice a dict's 1,200 instructions on 3.11.
        self._requests: dict[tuple[str, int], int] = {}
        self.deliveries: Counter[str] = Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=self.registry)

    # --- the hot path: plain counting -------------------------------------------------------
    # (The slots are read at a scrape: a subscriber would cost every task two SlotStates.)

    def task_ended(self, spec: TaskSpec, result: TaskResult) -> None:
        """From the task outcome path: one task timed (the dispatcher counts it)."""
        function = spec.function.name
        duration = self.durations.get(function)
        if duration is None:
            duration = self.durations[function] = Histogram()
        duration.observe(result.run_time)
        self.queue_wait.observe(result.queue_wait)

    def request_answered(self, route: str, status: int) -> None:
        key = (route, status)
        self._requests[key] = self._requests.get(key, 0) + 1

    @property
    def requests(self) -> Counter[tuple[str, int]]:
        """Requests answered, by route and status (a copy)."""
        return Counter(self._requests)

    def delivery(self, outcome: str) -> None:
        """`delivered`, `retried` (an attempt failed and another follows) or `failed`."""
        self.deliveries[outcome] += 1

    # --- a scrape ------------------------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape, in the format the scraper accepts; (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def collect(self) -> Iterator[Metric]:
        tasks = CounterMetricFamily(
            "base_worker_tasks", "Tasks ended, by outcome.", labels=("function", "mode", "outcome")
        )
        named = sorted(((f, m, o.value), count) for (f, m, o), count in self._tasks_ended().items())
        for labels, count in named:
            tasks.add_metric(labels, count)
        yield tasks
        durations = HistogramMetricFamily(
            "base_worker_task_duration_seconds",
            "Run time of a task's function.",
            labels=("function",),
        )
        for function, histogram in sorted(self.durations.items()):
            durations.add_metric((function,), histogram.buckets(), histogram.sum)
        yield durations
        wait = HistogramMetricFamily(
            "base_worker_queue_wait_seconds", "Time from acceptance to a slot."
        )
        wait.add_metric((), self.queue_wait.buckets(), self.queue_wait.sum)
        yield wait
        state = self._slots.state()
        yield GaugeMetricFamily("base_worker_slots_used", "Slots in use.", value=state.used)
        yield GaugeMetricFamily("base_worker_slots_limit", "Parallel slots.", value=state.limit)
        yield GaugeMetricFamily("base_worker_queue_length", "Tasks waiting.", value=state.queue)
        status = GaugeMetricFamily(
            "base_worker_status", "1 for the worker's current status.", labels=("status",)
        )
        for name in STATUSES:
            status.add_metric((name,), 1.0 if state.status == name else 0.0)
        yield status
        deliveries = CounterMetricFamily(
            "base_worker_webhook_deliveries",
            "Webhook delivery attempts' outcomes.",
            labels=("outcome",),
        )
        for outcome in DELIVERY_OUTCOMES:
            deliveries.add_metric((outcome,), self.deliveries[outcome])
        yield deliveries
        yield GaugeMetricFamily(
            "base_worker_webhook_pending",
            "Webhook tasks accepted and not yet delivered.",
            value=self._pending(),
        )
        yield GaugeMetricFamily(
            "base_worker_dead_letters", "Undeliverable results kept.", value=self._dead_letters()
        )
        yield self._link_states()
        services = GaugeMetricFamily(
            "base_worker_services_up", "1 while a service is up.", labels=("service",)
        )
        for service in self._services():
            services.add_metric((service["name"],), 1.0 if service["state"] == "up" else 0.0)
        yield services
        requests = CounterMetricFamily(
            "base_worker_http_requests", "HTTP requests answered.", labels=("route", "status")
        )
        for (route, code), count in sorted(self._requests.items()):
            requests.add_metric((route, str(code)), count)
        yield requests

    def _link_states(self) -> Metric:
        links = GaugeMetricFamily(
            "base_worker_lb_links",
            "Load balancer links: outbound 1 in its state; inbound, connections open.",
            labels=("direction", "state"),
        )
        section = self._links()
        outbound = "disabled"
        if section.get("enabled"):
            outbound = "connected" if section.get("connected") else "disconnected"
        for state in ("connected", "disconnected", "disabled"):
            links.add_metric(("outbound", state), 1.0 if state == outbound else 0.0)
        inbound = section.get("inbound", {})
        links.add_metric(("inbound", "connected"), float(inbound.get("connections", 0)))
        return links
