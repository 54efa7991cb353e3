"""POST /task in mode sync over real HTTP: every row of the contract table, priority, maintenance,
and that no outcome leaks a slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import AUTH, Running, task, wait_for
from worker.slots import SlotState

Start = Callable[..., Any]


def functions_module(runtime: Running) -> dict[str, Any]:
    """The globals of the loaded tests/functions/testing.py (each app loads its own copy)."""
    return runtime.registry.functions["wait_gate"].handler.__globals__


async def post(client: Any, body: Any, headers: dict[str, str] | None = None) -> Any:
    return await client.post("/task", json=body, headers=AUTH if headers is None else headers)


async def error_of(response: Any, status: int) -> dict[str, Any]:
    """Check an error answer's status and JSON shape; return its body."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"]
    return body


# --- accepted tasks ------------------------------------------------------------------------------


async def test_success_answers_200_with_result_and_task_id(worker_app: Start) -> None:
    client, _ = await worker_app()
    response = await post(client, task("hello", input={"name": "Andera"}))
    assert response.status == 200
    assert await response.json() == {"success": True, "result": {"message": "Hello Andera!"}}
    assert response.headers["X-Task-Id"]


async def test_default_input_and_param_default(worker_app: Start) -> None:
    client, _ = await worker_app()
    response = await post(client, task("hello"))
    assert await response.json() == {"success": True, "result": {"message": "Hello World!"}}


async def test_unknown_top_level_keys_are_ignored(worker_app: Start) -> None:
    client, _ = await worker_app()
    body = task("hello", _taskId="lb-task-42", _balancer={"anything": 1}, extra=[1, 2])
    response = await post(client, body)
    assert response.status == 200, await response.text()
    assert response.headers["X-Task-Id"]


async def test_context_tells_the_function_its_task(worker_app: Start) -> None:
    client, _ = await worker_app()
    response = await post(client, task("context", priority=7))
    result = (await response.json())["result"]
    assert result == {
        "task_id": response.headers["X-Task-Id"],
        "function": "context",
        "priority": 7,
        "mode": "sync",
        "stream": True,
    }


async def test_each_task_gets_its_own_id(worker_app: Start) -> None:
    client, _ = await worker_app()
    ids = {(await post(client, task("hello"))).headers["X-Task-Id"] for _ in range(5)}
    assert len(ids) == 5


async def test_function_raising_answers_500_and_the_worker_carries_on(worker_app: Start) -> None:
    client, runtime = await worker_app()
    response = await post(client, task("fail", input={"message": "disk on fire"}))
    body = await error_of(response, 500)
    assert body == {"success": False, "error": "disk on fire"}
    assert response.headers["X-Task-Id"]
    again = await post(client, task("hello"))
    assert again.status == 200
    assert runtime.slots.state().used == 0


async def test_result_that_is_not_json_is_a_500_naming_the_cause(worker_app: Start) -> None:
    client, runtime = await worker_app()
    response = await post(client, task("not_json"))
    body = await error_of(response, 500)
    assert "not JSON-serialisable" in body["error"]
    assert response.headers["X-Task-Id"]
    assert runtime.slots.state().used == 0


async def test_nan_result_is_a_500_not_invalid_json(worker_app: Start) -> None:
    client, _ = await worker_app()
    response = await post(client, task("nan_result"))
    body = await error_of(response, 500)
    assert "not JSON-serialisable" in body["error"]


async def test_a_result_nested_too_deeply_is_a_500_naming_the_cause(worker_app: Start) -> None:
    """It answered "Internal error" although the function succeeded."""
    client, runtime = await worker_app()
    body = await error_of(await post(client, task("deep_result")), 500)
    assert body["error"].startswith("Function result is not JSON-serialisable")
    assert runtime.slots.state().used == 0


async def test_async_timeout_answers_504(worker_app: Start) -> None:
    client, runtime = await worker_app()
    began = time.monotonic()
    response = await post(client, task("sleep_limited", input={"seconds": 5}))
    body = await error_of(response, 504)
    assert "timed out" in body["error"]
    assert response.headers["X-Task-Id"]
    assert time.monotonic() - began < 2.0
    assert runtime.slots.state().used == 0  # cancelled async work gives its slot back at once


async def test_default_timeout_applies_when_the_function_sets_none(worker_app: Start) -> None:
    client, _ = await worker_app(worker={"default_timeout": 0.2})
    response = await post(client, task("sleep", input={"seconds": 5}))
    await error_of(response, 504)


async def test_thread_overrun_answers_504_at_once_but_keeps_its_slot(worker_app: Start) -> None:
    client, runtime = await worker_app(worker={"slots": 2})
    began = time.monotonic()
    response = await post(client, task("block_limited", input={"seconds": 1.2}))
    answered = time.monotonic() - began
    await error_of(response, 504)
    assert answered < 1.0, "504 must come at the timeout, not when the thread returns"
    # The thread cannot be killed: its slot stays taken until it really returns.
    assert runtime.slots.state().used == 1
    await wait_for(lambda: runtime.slots.state().used == 0, timeout=5)
    assert time.monotonic() - began >= 1.2


async def test_max_retries_retries_a_raising_function(worker_app: Start) -> None:
    client, _ = await worker_app()
    response = await post(client, task("flaky", input={"key": "retry-1"}))
    assert response.status == 200, await response.text()
    assert await response.json() == {"success": True, "result": 3}  # third attempt


# --- error rows, in the contract's order ---------------------------------------------------------


async def test_401_carries_www_authenticate(worker_app: Start) -> None:
    client, _ = await worker_app()
    response = await post(client, task("hello"), headers={})
    await error_of(response, 401)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "X-Task-Id" not in response.headers


async def test_503_in_maintenance_with_retry_after(worker_app: Start) -> None:
    client, _ = await worker_app()
    assert (await client.post("/off", headers=AUTH)).status == 200
    response = await post(client, task("hello"))
    body = await error_of(response, 503)
    assert body["error"] == "Worker is in maintenance mode"
    assert int(response.headers["Retry-After"]) > 0
    assert "X-Task-Id" not in response.headers


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"hello"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
)
async def test_400_body_not_json_or_not_an_object(
    worker_app: Start, raw: bytes, message: str
) -> None:
    client, _ = await worker_app()
    headers = {**AUTH, "Content-Type": "application/json"}
    body = await error_of(await client.post("/task", data=raw, headers=headers), 400)
    assert message in body["error"]


async def test_400_for_json_nested_too_deeply_not_a_500(worker_app: Start) -> None:
    client, runtime = await worker_app()
    headers = {**AUTH, "Content-Type": "application/json"}
    response = await client.post("/task", data=b"[" * 100_000, headers=headers)
    await error_of(response, 400)
    assert runtime.slots.state().used == 0


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
async def test_400_for_non_json_number_constants(worker_app: Start, constant: bytes) -> None:
    client, _ = await worker_app()
    raw = b'{"function": "typed", "contract": 1, "input": {"text": "ab", "count": ' + constant
    headers = {**AUTH, "Content-Type": "application/json"}
    body = await error_of(await client.post("/task", data=raw + b"}}", headers=headers), 400)
    assert "not valid JSON" in body["error"]


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"[1e999]"])
async def test_400_for_numbers_that_overflow_to_infinity(worker_app: Start, number: bytes) -> None:
    """1e400 parsed as infinity: a `sleep` of 1e400 seconds ran to its timeout."""
    client, runtime = await worker_app()
    raw = b'{"function": "sleep", "contract": 1, "input": {"seconds": ' + number + b"}}"
    headers = {**AUTH, "Content-Type": "application/json"}
    body = await error_of(await client.post("/task", data=raw, headers=headers), 400)
    assert "not valid JSON" in body["error"]
    assert runtime.dispatcher.counts.total() == 0


async def test_413_over_max_body_size(worker_app: Start) -> None:
    client, runtime = await worker_app(http={"max_body_size": 1024})
    big = task("hello", input={"name": "x" * 2000})
    body = await error_of(await post(client, big), 413)
    assert "1024" in body["error"]
    assert runtime.slots.state() == SlotState("ready", 0, 10, 0)


async def test_413_over_max_body_size_without_content_length(worker_app: Start) -> None:
    client, _ = await worker_app(http={"max_body_size": 1024})

    async def chunked() -> Any:
        for _ in range(4):
            yield b" " * 1000

    headers = {**AUTH, "Content-Type": "application/json"}
    await error_of(await client.post("/task", data=chunked(), headers=headers), 413)


async def test_body_just_under_max_body_size_is_accepted(worker_app: Start) -> None:
    client, _ = await worker_app(http={"max_body_size": 1024})
    small = task("hello", input={"name": "x" * 900})
    assert (await post(client, small)).status == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"contract": 1}, "function"),
        ({"function": "", "contract": 1}, "function"),
        ({"function": 5, "contract": 1}, "function"),
        ({"function": "hello"}, "contract"),
        ({"function": "hello", "contract": "1"}, "contract"),
        ({"function": "hello", "contract": 1.5}, "contract"),
        ({"function": "hello", "contract": True}, "contract"),
        ({"function": "hello", "contract": 1, "priority": 0}, "priority"),
        ({"function": "hello", "contract": 1, "priority": 2097153}, "priority"),
        ({"function": "hello", "contract": 1, "priority": "1"}, "priority"),
        ({"function": "hello", "contract": 1, "priority": 1.5}, "priority"),
        ({"function": "hello", "contract": 1, "priority": True}, "priority"),
        ({"function": "hello", "contract": 1, "mode": "carrier-pigeon"}, "mode"),
        ({"function": "hello", "contract": 1, "input": [1]}, "input"),
        ({"function": "hello", "contract": 1, "input": None}, "input"),
        ({"function": "hello", "contract": 1, "mode": "webhook"}, "webhook"),
        (
            {"function": "hello", "contract": 1, "mode": "webhook", "webhook": {"url": "ftp://x"}},
            "webhook",
        ),
        (
            {"function": "hello", "contract": 1, "mode": "webhook", "webhook": {"url": "nope"}},
            "webhook",
        ),
        ({"function": "hello", "contract": 1, "webhook": {}}, "webhook"),
    ],
)
async def test_400_invalid_envelope_names_the_field(
    worker_app: Start, body: dict[str, Any], field: str
) -> None:
    client, _ = await worker_app()
    answer = await error_of(await post(client, body), 400)
    assert answer["error"] == "Invalid task request"
    assert set(answer["details"]) == {field}
    messages = answer["details"][field]
    if field == "webhook" and isinstance(messages, dict):
        messages = messages.get("url", messages.get("_schema"))
    assert isinstance(messages, list) and all(isinstance(m, str) for m in messages)


async def test_400_invalid_webhook_url_is_reported_under_url(worker_app: Start) -> None:
    client, _ = await worker_app()
    body = task("hello", mode="webhook", webhook={"url": "ftp://example.invalid/x"})
    answer = await error_of(await post(client, body), 400)
    assert list(answer["details"]["webhook"]) == ["url"]


async def test_priority_bounds_are_accepted(worker_app: Start) -> None:
    client, _ = await worker_app()
    for priority in (1, 2097152):
        assert (await post(client, task("hello", priority=priority))).status == 200


async def test_400_contract_mismatch(worker_app: Start) -> None:
    client, _ = await worker_app()
    body = await error_of(await post(client, task("hello", contract=2)), 400)
    assert body["error"] == "Contract version mismatch: requested 2, worker is 1"


async def test_contract_of_the_worker_is_configurable(worker_app: Start) -> None:
    client, _ = await worker_app(worker={"contract": 3})
    assert (await post(client, task("hello", contract=3))).status == 200
    body = await error_of(await post(client, task("hello", contract=1)), 400)
    assert body["error"] == "Contract version mismatch: requested 1, worker is 3"


async def test_400_group_mismatch_and_matching_group_accepted(worker_app: Start) -> None:
    client, _ = await worker_app(worker={"group": "gpu"})
    body = await error_of(await post(client, task("hello", group="cpu")), 400)
    assert "cpu" in body["error"] and "gpu" in body["error"]
    assert (await post(client, task("hello", group="gpu"))).status == 200


async def test_404_unknown_function(worker_app: Start) -> None:
    client, _ = await worker_app()
    body = await error_of(await post(client, task("x")), 404)
    assert body == {"success": False, "error": "Function 'x' not found"}


async def test_400_stream_on_a_function_without_streaming(worker_app: Start) -> None:
    client, _ = await worker_app()
    body = await error_of(await post(client, task("fail", mode="stream")), 400)
    assert "fail" in body["error"] and "stream" in body["error"]


async def test_400_input_failing_params_reports_each_param(worker_app: Start) -> None:
    client, _ = await worker_app()
    bad = {
        "text": "A",  # too short and not lowercase letters
        "count": 11,  # over max
        "flag": "yes",  # not a boolean
        "colour": "blue",  # not in enum
        "tags": [1, 2, 3],  # too long
        "meta": [],  # not an object
        "extra": 1,  # unknown key
    }
    body = await error_of(await post(client, task("typed", input=bad)), 400)
    assert "typed" in body["error"]
    assert set(body["details"]) == set(bad)
    for messages in body["details"].values():
        assert isinstance(messages, list) and messages
        assert all(isinstance(m, str) for m in messages)
    assert len(body["details"]["text"]) == 2


async def test_400_missing_required_param(worker_app: Start) -> None:
    client, _ = await worker_app()
    body = await error_of(await post(client, task("typed", input={})), 400)
    assert body["details"] == {"text": ["Missing data for required field."]}


async def test_invalid_input_is_refused_before_any_slot_or_queue_place(worker_app: Start) -> None:
    client, runtime = await worker_app(worker={"slots": 1, "max_queue": 1})
    steer = functions_module(runtime)
    holder = asyncio.create_task(post(client, task("wait_gate", input={"gate": "g-input"})))
    await asyncio.wait_for(steer["started"]("g-input").wait(), 5)
    queued = asyncio.create_task(
        post(client, task("wait_gate", input={"gate": "g-input", "label": "queued"}))
    )
    await wait_for(lambda: runtime.slots.state().queue == 1)
    changes: list[SlotState] = []
    unsubscribe = runtime.slots.subscribe(lambda: changes.append(runtime.slots.state()))
    # Slot and queue are both full: a 503 here would mean admission came before validation.
    response = await post(client, task("typed", input={"text": 5}))
    await error_of(response, 400)
    assert "X-Task-Id" not in response.headers
    unsubscribe()
    assert changes == []
    steer["gate"]("g-input").set()
    assert [r.status for r in await asyncio.gather(holder, queued)] == [200, 200]


async def test_503_when_the_queue_is_full_then_queued_work_still_runs(worker_app: Start) -> None:
    client, runtime = await worker_app(worker={"slots": 1, "max_queue": 2})
    steer = functions_module(runtime)
    held = [asyncio.create_task(post(client, task("wait_gate", input={"gate": "g-full"})))]
    await asyncio.wait_for(steer["started"]("g-full").wait(), 5)
    for index in range(2):
        body = task("wait_gate", input={"gate": "g-full", "label": f"q{index}"})
        held.append(asyncio.create_task(post(client, body)))
        await wait_for(lambda i=index: runtime.slots.state().queue == i + 1)  # type: ignore[misc]
    response = await post(client, task("hello"))
    body = await error_of(response, 503)
    assert "queue" in body["error"].lower()
    assert int(response.headers["Retry-After"]) > 0
    steer["gate"]("g-full").set()
    responses = await asyncio.gather(*held)
    assert [r.status for r in responses] == [200, 200, 200]
    assert all(r.headers["X-Task-Id"] for r in responses)
    assert (await post(client, task("hello"))).status == 200


async def test_unknown_route_and_wrong_method_answer_json(worker_app: Start) -> None:
    client, _ = await worker_app()
    await error_of(await client.get("/nope"), 404)
    wrong = await client.get("/task")
    await error_of(wrong, 405)
    assert "POST" in wrong.headers["Allow"]


# --- priority and maintenance --------------------------------------------------------------------


async def test_queued_tasks_run_by_priority_then_arrival(worker_app: Start) -> None:
    client, runtime = await worker_app(worker={"slots": 1})
    steer = functions_module(runtime)
    steer["gate"]("open").set()
    holder = asyncio.create_task(
        post(client, task("wait_gate", input={"gate": "hold", "label": "holder"}))
    )
    await asyncio.wait_for(steer["started"]("holder").wait(), 5)
    queued = []
    for count, (label, priority) in enumerate(
        [("p3", 3), ("p1-first", 1), ("p2", 2), ("p1-second", 1)], start=1
    ):
        body = task("wait_gate", input={"gate": "open", "label": label}, priority=priority)
        queued.append(asyncio.create_task(post(client, body)))
        await wait_for(lambda c=count: runtime.slots.state().queue == c)  # type: ignore[misc]
    assert steer["FINISHED"] == []
    steer["gate"]("hold").set()
    responses = await asyncio.gather(holder, *queued)
    assert [(await r.json())["result"] for r in responses] == [
        "holder",
        "p3",
        "p1-first",
        "p2",
        "p1-second",
    ]
    assert steer["FINISHED"] == ["holder", "p1-first", "p1-second", "p2", "p3"]


async def test_maintenance_keeps_accepted_work_and_refuses_new(worker_app: Start) -> None:
    client, runtime = await worker_app(worker={"slots": 1})
    steer = functions_module(runtime)
    accepted = [
        asyncio.create_task(post(client, task("wait_gate", input={"gate": "m", "label": "run"})))
    ]
    await asyncio.wait_for(steer["started"]("run").wait(), 5)
    for index in range(2):
        body = task("wait_gate", input={"gate": "m", "label": f"queued{index}"})
        accepted.append(asyncio.create_task(post(client, body)))
        await wait_for(lambda i=index: runtime.slots.state().queue == i + 1)  # type: ignore[misc]

    off = await client.post("/off", headers=AUTH)
    assert off.status == 200
    assert await off.json() == {"status": "maintenance", "message": "Maintenance mode enabled"}
    assert (await client.post("/off", headers=AUTH)).status == 200  # idempotent

    refused = await post(client, task("hello"))
    assert (await error_of(refused, 503))["error"] == "Worker is in maintenance mode"
    assert refused.headers["Retry-After"]

    assert await (await client.get("/health")).json() == {"status": "maintenance"}
    detailed = await (await client.get("/health", headers=AUTH)).json()
    assert detailed["status"] == "maintenance"
    assert detailed["slots"] == {"used": 1, "available": 0, "limit": 1, "queue": 2}

    steer["gate"]("m").set()
    responses = await asyncio.gather(*accepted)
    assert [r.status for r in responses] == [200, 200, 200]
    assert [(await r.json())["result"] for r in responses] == ["run", "queued0", "queued1"]
    detailed = await (await client.get("/health", headers=AUTH)).json()
    assert detailed["slots"] == {"used": 0, "available": 0, "limit": 1, "queue": 0}

    on = await client.post("/on", headers=AUTH)
    assert on.status == 200
    assert await on.json() == {"status": "ready", "message": "Maintenance mode disabled"}
    assert (await client.post("/on", headers=AUTH)).status == 200  # idempotent
    assert (await post(client, task("hello"))).status == 200
    detailed = await (await client.get("/health", headers=AUTH)).json()
    assert detailed["status"] == "ready"
    assert detailed["slots"] == {"used": 0, "available": 1, "limit": 1, "queue": 0}


# --- the event loop stays free -------------------------------------------------------------------


async def test_blocking_plain_def_does_not_delay_health(worker_app: Start) -> None:
    client, runtime = await worker_app()
    blocking = asyncio.create_task(post(client, task("block", input={"seconds": 1.5})))
    await wait_for(lambda: runtime.slots.state().used == 1)
    began = time.monotonic()
    latencies = []
    for _ in range(3):
        start = time.monotonic()
        response = await client.get("/health", headers=AUTH)
        assert response.status == 200
        assert (await response.json())["slots"]["used"] == 1
        latencies.append(time.monotonic() - start)
    assert not blocking.done(), "the block must still be running while /health is measured"
    assert max(latencies) < 0.5, latencies
    assert time.monotonic() - began < 1.0
    assert (await (await blocking).json())["result"] == {"blocked": 1.5}


# --- no leaks ------------------------------------------------------------------------------------


async def test_300_mixed_tasks_leave_no_slot_or_queue_place(worker_app: Start) -> None:
    client, runtime = await worker_app(worker={"slots": 4, "max_queue": 1000})
    steer = functions_module(runtime)
    limit = asyncio.Semaphore(64)

    async def call(body: dict[str, Any]) -> int:
        async with limit:
            response = await post(client, body)
            await response.read()
            return int(response.status)

    mix: list[tuple[dict[str, Any], int]] = []
    for index in range(266):
        kind = index % 8
        if kind in (0, 1):
            mix.append((task("hello", input={"name": str(index)}, priority=index % 5 + 1), 200))
        elif kind == 2:
            mix.append((task("sleep", input={"seconds": 0.01}), 200))
        elif kind == 3:
            mix.append((task("fail"), 500))
        elif kind == 4:
            mix.append((task("typed", input={"text": 1}), 400))
        elif kind == 5:
            mix.append((task("thread_name"), 200))
        elif kind == 6:
            mix.append((task("nope"), 404))
        else:
            mix.append((task("flaky", input={"key": f"k{index}"}), 200))
    for _ in range(6):
        mix.append((task("sleep_limited", input={"seconds": 5}), 504))
    for _ in range(4):
        mix.append((task("block_limited", input={"seconds": 0.4}), 504))
    statuses = await asyncio.gather(*(call(body) for body, _ in mix))
    assert list(statuses) == [expected for _, expected in mix]

    # Clients that hang up: 4 while running (those run on), 20 while queued (those leave).
    sessions: list[aiohttp.ClientSession] = []
    requests: list[asyncio.Task[Any]] = []
    url = str(client.make_url("/task"))

    def hang_up_later(body: dict[str, Any]) -> None:
        session = aiohttp.ClientSession()
        sessions.append(session)
        requests.append(asyncio.create_task(session.post(url, json=body, headers=AUTH)))

    await wait_for(lambda: runtime.slots.state().used == 0, timeout=5)
    for index in range(4):
        hang_up_later(task("wait_gate", input={"gate": "leak", "label": f"run{index}"}))
    await wait_for(lambda: runtime.slots.state().used == 4)
    for index in range(20):
        hang_up_later(task("wait_gate", input={"gate": "leak", "label": f"queued{index}"}))
    await wait_for(lambda: runtime.slots.state().queue == 20)
    for request in requests:
        request.cancel()
    for session in sessions:
        await session.close()
    await wait_for(lambda: runtime.slots.state().queue == 0)
    assert runtime.slots.state().used == 4  # running tasks run on; queued ones took no slot
    steer["gate"]("leak").set()
    await wait_for(lambda: runtime.slots.state() == SlotState("ready", 0, 4, 0), timeout=5)
    await wait_for(lambda: runtime.dispatcher.in_flight == 0)
    assert sorted(steer["FINISHED"]) == [f"run{index}" for index in range(4)]
    assert len(mix) + len(requests) == 300
    # And the worker still serves.
    assert (await post(client, task("hello"))).status == 200
    assert runtime.slots.state() == SlotState("ready", 0, 4, 0)
