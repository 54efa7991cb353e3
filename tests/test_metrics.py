"""GET /metrics on a real server: the Prometheus text parses with prometheus_client's own parser,
and its values match what the test did."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client import Histogram as PromHistogram
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AUTH, AUTH_KEY, LB_KEY, Worker, task, wait_for
from tests.test_webhooks import Start as ReceiverStart
from tests.test_webhooks import receiver, webhook_config
from worker.metrics import BUCKETS, Histogram

__all__ = ["receiver"]  # the receiver fixture, shared with the webhook tests

StartWorker = Callable[..., Awaitable[Worker]]


async def scrape(client: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Sample name -> {labels (sorted tuple): value}."""
    response = await client.get(
        "/metrics", headers=headers or {"Authorization": f"Bearer {LB_KEY}"}
    )
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def test_metrics_need_either_key_in_authorization(worker_app: StartWorker) -> None:
    client, _ = await worker_app()
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers={"Authorization": "wrong"})).status == 401
    for key in (AUTH_KEY, LB_KEY, f"Bearer {AUTH_KEY}"):
        assert (await client.get("/metrics", headers={"Authorization": key})).status == 200


async def test_task_counts_and_histograms_match_what_was_done(worker_app: StartWorker) -> None:
    client, _ = await worker_app()
    for _ in range(3):
        assert (await client.post("/task", json=task("hello"), headers=AUTH)).status == 200
    assert (await client.post("/task", json=task("fail"), headers=AUTH)).status == 500
    assert (
        await client.post("/task", json=task("sleep_limited", input={"seconds": 5}), headers=AUTH)
    ).status == 504
    stream = task("hello", mode="stream")
    assert (await client.post("/task", json=stream, headers=AUTH)).status == 200
    samples = await scrape(client)
    tasks = samples["base_worker_tasks_total"]
    assert tasks[(("function", "hello"), ("mode", "sync"), ("outcome", "succeeded"))] == 3
    assert tasks[(("function", "hello"), ("mode", "stream"), ("outcome", "succeeded"))] == 1
    assert tasks[(("function", "fail"), ("mode", "sync"), ("outcome", "failed"))] == 1
    assert tasks[(("function", "sleep_limited"), ("mode", "sync"), ("outcome", "timed_out"))] == 1
    counts = samples["base_worker_task_duration_seconds_count"]
    assert counts[(("function", "hello"),)] == 4
    slow = samples["base_worker_task_duration_seconds_bucket"]
    assert slow[(("function", "sleep_limited"), ("le", "0.25"))] == 0  # it ran 0.3 s
    assert slow[(("function", "sleep_limited"), ("le", "0.5"))] == 1
    assert samples["base_worker_queue_wait_seconds_count"][()] == 6
    assert samples["base_worker_slots_limit"][()] == 10
    assert samples["base_worker_slots_used"][()] == 0
    assert samples["base_worker_status"][(("status", "ready"),)] == 1
    assert samples["base_worker_status"][(("status", "draining"),)] == 0
    requests = samples["base_worker_http_requests_total"]
    assert requests[(("route", "/task"), ("status", "200"))] == 4
    assert requests[(("route", "/task"), ("status", "500"))] == 1
    assert "process_cpu_seconds_total" in samples and "python_info" in samples


async def test_slots_queue_and_status_follow_the_slot_manager(worker_app: StartWorker) -> None:
    client, running = await worker_app(worker={"slots": 1})
    testing = running.registry.get("wait_gate").handler.__globals__  # type: ignore[union-attr]
    testing["GATES"].pop("metrics", None)
    bodies = [task("wait_gate", input={"gate": "metrics", "label": f"m{i}"}) for i in range(3)]
    posts = [asyncio.create_task(client.post("/task", json=b, headers=AUTH)) for b in bodies]
    await wait_for(lambda: running.slots.state().queue == 2)
    samples = await scrape(client)
    assert (samples["base_worker_slots_used"][()], samples["base_worker_queue_length"][()]) == (
        1,
        2,
    )
    assert (await client.post("/off", headers=AUTH)).status == 200
    samples = await scrape(client)
    assert samples["base_worker_status"][(("status", "maintenance"),)] == 1
    assert samples["base_worker_status"][(("status", "ready"),)] == 0
    testing["gate"]("metrics").set()
    assert [r.status for r in await asyncio.gather(*posts)] == [200, 200, 200]
    samples = await scrape(client)
    assert (samples["base_worker_slots_used"][()], samples["base_worker_queue_length"][()]) == (
        0,
        0,
    )


async def test_unknown_routes_share_one_label(worker_app: StartWorker) -> None:
    client, _ = await worker_app()
    for path in ("/a", "/b/c", "/task-1234"):
        assert (await client.get(path)).status == 404
    requests = (await scrape(client))["base_worker_http_requests_total"]
    assert requests[(("route", "unmatched"), ("status", "404"))] == 3
    assert not any(("route", "/a") in labels for labels in requests)


async def test_webhook_deliveries_are_counted_by_outcome(
    worker_app: StartWorker, receiver: ReceiverStart
) -> None:
    hook = await receiver([503, 200])
    client, running = await worker_app(webhook=webhook_config(retry_delay=0.01, max_retries=1))
    failing = await receiver([500, 500])
    for url in (hook.url, failing.url):
        body = task("hello", mode="webhook", webhook={"url": url})
        assert (await client.post("/task", json=body, headers=AUTH)).status == 202
    await wait_for(lambda: running.deliveries.delivered + running.deliveries.failed == 2)
    deliveries = (await scrape(client))["base_worker_webhook_deliveries_total"]
    assert deliveries[(("outcome", "delivered"),)] == 1
    assert deliveries[(("outcome", "retried"),)] == 2
    assert deliveries[(("outcome", "failed"),)] == 1
    assert (await scrape(client))["base_worker_webhook_pending"][()] == 0


@given(st.lists(st.floats(min_value=0, max_value=20) | st.sampled_from(BUCKETS), max_size=30))
def test_histogram_buckets_agree_with_prometheus_client(values: list[float]) -> None:
    ours = Histogram()
    theirs = PromHistogram("d", "d", buckets=BUCKETS, registry=CollectorRegistry())
    for value in values:
        ours.observe(value)
        theirs.observe(value)
    expected = {
        sample.labels["le"]: sample.value
        for sample in theirs.collect()[0].samples
        if sample.name == "d_bucket"
    }
    assert dict(ours.buckets()) == expected
    assert ours.sum == pytest.approx(sum(values))
