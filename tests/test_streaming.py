"""Mode stream against a real server: chunks as produced, SSE, failures, hang-ups, back-pressure;
and its pieces (worker/streaming.py) without one."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import http_writer
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import AUTH, Running, Worker, task, wait_for
from worker.jsoncodec import NotJSON
from worker.outcomes import Outcome
from worker.streaming import chunk_text, event_frame, plain_bytes, wants_events

StartWorker = Callable[..., Awaitable[Worker]]
SSE = {**AUTH, "Accept": "text/event-stream"}


def functions_of(runtime: Running) -> ModuleType:
    """The test functions module as the worker loaded it (from its file, not as a package)."""
    spec = runtime.registry.get("stream_gate")
    assert spec is not None
    return sys.modules[spec.handler.__module__]


async def test_first_chunk_arrives_while_the_function_still_runs(worker_app: StartWorker) -> None:
    client, runtime = await worker_app()
    testing = functions_of(runtime)
    body = task("stream_gate", mode="stream", input={"gate": "first-chunk"})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert resp.headers["X-Task-Id"]
        assert await resp.content.readline() == b"first\n"
        assert "first-chunk" not in testing.FINISHED  # the function is waiting for us
        testing.gate("first-chunk").set()
        assert await resp.content.read() == b"second\n"
    assert "first-chunk" in testing.FINISHED


async def test_bytes_chunks_go_out_as_utf8_with_undecodable_bytes_replaced(
    worker_app: StartWorker,
) -> None:
    client, _ = await worker_app()
    async with client.post("/task", json=task("stream_bytes", mode="stream"), headers=AUTH) as r:
        assert (r.status, await r.read()) == (
            200,
            "ascii \u00e9t\u00e9 \ufffd mutable text".encode(),
        )


async def test_hello_streams_its_greeting_and_json_chunks_end_with_a_newline(
    worker_app: StartWorker,
) -> None:
    client, _ = await worker_app()
    hello = task("hello", mode="stream", input={"name": "Andera"})
    async with client.post("/task", json=hello, headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.text() == "Hello Andera!"
    async with client.post("/task", json=task("stream_shapes", mode="stream"), headers=AUTH) as r:
        assert await r.text() == 'line one\nline two{"n": 1}\n'


async def test_server_sent_events_frame_every_chunk_then_end(worker_app: StartWorker) -> None:
    client, _ = await worker_app()
    async with client.post("/task", json=task("stream_shapes", mode="stream"), headers=SSE) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        task_id = r.headers["X-Task-Id"]
        text = await r.text()
    end = json.dumps({"success": True, "task_id": task_id})
    assert text == (
        'data: line one\ndata: line two\n\ndata: {"n": 1}\n\n' + f"event: end\ndata: {end}\n\n"
    )


async def test_failure_after_output_is_an_error_event_in_sse(worker_app: StartWorker) -> None:
    client, runtime = await worker_app()
    testing = functions_of(runtime)
    body = task("stream_gate", mode="stream", input={"gate": "sse-fail", "fail": "after"})
    async with client.post("/task", json=body, headers=SSE) as resp:
        assert await resp.content.readline() == b"data: first\n"
        testing.gate("sse-fail").set()
        rest = (await resp.read()).decode()
    assert rest.startswith("data: \n\nevent: error\ndata: ")
    error = json.loads(rest.split("event: error\ndata: ", 1)[1])
    assert error == {
        "success": False,
        "task_id": resp.headers["X-Task-Id"],
        "error": "failed after output began",
    }


async def test_a_chunk_that_is_not_json_ends_the_stream_in_error_never_as_invalid_json(
    worker_app: StartWorker,
) -> None:
    """A chunk {"v": inf} was streamed as `{"v": Infinity}`."""
    client, _ = await worker_app()
    body = task("stream_infinity", mode="stream")
    async with client.post("/task", json=body, headers=SSE) as resp:
        text = (await resp.read()).decode()
    assert "Infinity" not in text
    assert text.startswith("data: first\n")
    error = json.loads(text.split("event: error\ndata: ", 1)[1])
    assert error["error"].startswith("Function result is not JSON-serialisable")
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert await resp.content.readline() == b"first\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_failure_after_output_aborts_a_plain_stream(worker_app: StartWorker) -> None:
    client, runtime = await worker_app()
    testing = functions_of(runtime)
    body = task("stream_gate", mode="stream", input={"gate": "abort", "fail": "after"})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert await resp.content.readline() == b"first\n"
        testing.gate("abort").set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await wait_for(lambda: runtime.slots.state().used == 0)
    # The worker carries on.
    async with client.post("/task", json=task("hello"), headers=AUTH) as resp:
        assert resp.status == 200


async def test_failure_before_output_is_a_json_error(worker_app: StartWorker) -> None:
    client, _ = await worker_app(worker={"default_timeout": 0.2})
    body = task("stream_gate", mode="stream", input={"gate": "early", "fail": "before"})
    for headers in (AUTH, SSE):
        async with client.post("/task", json=body, headers=headers) as resp:
            assert resp.status == 500
            assert resp.headers["X-Task-Id"]
            assert await resp.json() == {"success": False, "error": "failed before any output"}
    slow = task("sleep", mode="stream", input={"seconds": 5})
    async with client.post("/task", json=slow, headers=AUTH) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "Function timed out after 0.2s"


async def test_stream_on_a_function_without_streaming_is_refused(worker_app: StartWorker) -> None:
    client, runtime = await worker_app()
    async with client.post("/task", json=task("typed", mode="stream"), headers=AUTH) as resp:
        assert resp.status == 400
    assert runtime.dispatcher.in_flight == 0


async def test_a_client_that_hangs_up_cancels_the_stream_and_frees_its_slot(
    worker_app: StartWorker,
) -> None:
    client, runtime = await worker_app(worker={"slots": 1})
    testing = functions_of(runtime)
    body = task("stream_until_gone", mode="stream", input={"gate": "hang-up"})
    resp = await client.post("/task", json=body, headers=AUTH)
    assert await resp.content.readline() == b"first\n"
    assert runtime.slots.state().used == 1
    resp.close()  # drops the connection
    testing.gate("hang-up").set()
    await wait_for(lambda: runtime.slots.state().used == 0)
    assert "hang-up" not in testing.FINISHED
    written = testing.PROGRESS.get("hang-up", 0)
    assert written < 4999
    assert runtime.dispatcher.in_flight == 0
    assert runtime.dispatcher.counts == {Outcome.CANCELLED: 1}
    # The freed slot serves the next task.
    async with client.post("/task", json=task("hello"), headers=AUTH) as resp:
        assert resp.status == 200


async def test_a_queued_stream_whose_client_hangs_up_leaves_the_queue(
    worker_app: StartWorker,
) -> None:
    client, runtime = await worker_app(worker={"slots": 1})
    testing = functions_of(runtime)
    holder = task("stream_until_gone", mode="stream", input={"gate": "holder"})
    held = await client.post("/task", json=holder, headers=AUTH)
    assert await held.content.readline() == b"first\n"
    queued = asyncio.ensure_future(
        client.post("/task", json=task("hello", mode="stream"), headers=AUTH)
    )
    await wait_for(lambda: runtime.slots.state().queue == 1)
    queued.cancel()  # the client goes while its stream waits for a slot
    with pytest.raises(asyncio.CancelledError):
        await queued
    await wait_for(lambda: runtime.slots.state().queue == 0)
    assert runtime.dispatcher.counts == {Outcome.CANCELLED: 1}
    assert runtime.slots.state().used == 1  # the holder's slot only
    held.close()
    testing.gate("holder").set()
    await wait_for(lambda: runtime.dispatcher.in_flight == 0)
    assert runtime.slots.state().used == 0
    async with client.post("/task", json=task("hello"), headers=AUTH) as resp:
        assert resp.status == 200


async def test_a_stream_with_a_slot_free_runs_in_its_requests_task(
    worker_app: StartWorker,
) -> None:
    """As in sync, no task of its own: only a stream that must queue gets one."""
    client, runtime = await worker_app(worker={"slots": 1})
    testing = functions_of(runtime)
    loop = asyncio.get_running_loop()
    job_tasks: list[str] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        if getattr(coro, "__qualname__", "") == "Dispatcher._run":
            job_tasks.append(coro.cr_frame.f_locals["job"].spec.function.name)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        holder = task("stream_until_gone", mode="stream", input={"gate": "in-task"})
        held = await client.post("/task", json=holder, headers=AUTH)
        assert await held.content.readline() == b"first\n"
        assert job_tasks == []
        queued = asyncio.ensure_future(
            client.post("/task", json=task("hello", mode="stream"), headers=AUTH)
        )
        await wait_for(lambda: runtime.slots.state().queue == 1)
        held.close()
        testing.gate("in-task").set()
        async with await queued as resp:
            assert await resp.text() == "Hello World!"
        assert job_tasks == ["hello"]
    finally:
        loop.set_task_factory(factory)
    await wait_for(lambda: runtime.dispatcher.in_flight == 0)
    assert runtime.dispatcher.counts == {Outcome.CANCELLED: 1, Outcome.SUCCEEDED: 1}


async def test_the_shutdown_cancels_a_running_stream_and_the_worker_serves_on(
    worker_app: StartWorker,
) -> None:
    client, runtime = await worker_app(worker={"slots": 1})
    events = task("stream_until_gone", mode="stream", input={"gate": "shutdown-sse"})
    async with client.post("/task", json=events, headers=SSE) as resp:
        assert await resp.content.readline() == b"data: first\n"
        assert runtime.dispatcher.cancel_all() == 1
        text = (await resp.read()).decode()
    error = json.loads(text.split("event: error\ndata: ", 1)[1])
    assert error["error"] == "Task cancelled: the worker is shutting down"
    plain = task("stream_until_gone", mode="stream", input={"gate": "shutdown-plain"})
    async with client.post("/task", json=plain, headers=AUTH) as resp:
        assert await resp.content.readline() == b"first\n"
        assert runtime.dispatcher.cancel_all() == 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()  # no clean end: never mistaken for a complete stream
    assert runtime.dispatcher.counts == {Outcome.CANCELLED: 2}
    assert runtime.slots.state().used == 0
    async with client.post("/task", json=task("hello", mode="stream"), headers=AUTH) as resp:
        assert await resp.text() == "Hello World!"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="from 3.12 on, aiohttp's own choice")
async def test_the_listener_has_aiohttp_pass_a_chunk_and_its_frame_on_unjoined(
    worker_app: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_writer, "SKIP_WRITELINES", True)  # aiohttp's choice on 3.11
    client, _ = await worker_app()
    assert http_writer.SKIP_WRITELINES is False
    body = task("stream_bulk", mode="stream", input={"key": "pieces", "chunks": 64})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert await resp.read() == b"x" * 65536 * 64


async def test_a_reader_that_stops_reading_makes_the_function_wait(
    worker_app: StartWorker,
) -> None:
    client, runtime = await worker_app()
    testing = functions_of(runtime)
    chunks = 512  # 32 MiB: far more than the socket buffers between us hold
    body = task("stream_bulk", mode="stream", input={"key": "slow-reader", "chunks": chunks})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        await resp.content.readexactly(65536)
        await wait_for(lambda: testing.PROGRESS.get("slow-reader", 0) > 1)

        def finished() -> bool:
            return "slow-reader" in testing.FINISHED

        # Not reading: the writes must stall well before the end (a bounded negative wait).
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await wait_for(finished, timeout=1.0)
        assert testing.PROGRESS["slow-reader"] < chunks
        received = 65536
        while data := await resp.content.read(1 << 20):
            received += len(data)
    assert received == chunks * 65536
    await wait_for(finished)
    assert runtime.slots.state().used == 0


async def test_a_stream_whose_output_began_is_not_retried(worker_app: StartWorker) -> None:
    client, runtime = await worker_app()
    testing = functions_of(runtime)
    body = task("stream_flaky", mode="stream", input={"key": "no-retry"})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert await resp.content.readline() == b"attempt 1\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert testing.CALLS["no-retry"] == 1
    # The same function in sync mode is retried as declared.
    sync = task("stream_flaky", input={"key": "sync"})
    async with client.post("/task", json=sync, headers=AUTH) as resp:
        assert resp.status == 200
    assert testing.CALLS["sync"] == 3


async def test_a_returned_value_is_the_last_chunk_and_must_be_json(
    worker_app: StartWorker,
) -> None:
    client, _ = await worker_app()
    body = task("sleep", mode="stream", input={"seconds": 0})
    async with client.post("/task", json=body, headers=AUTH) as resp:
        assert await resp.text() == '{"slept": 0}\n'
    bad = task("stream_returns_object", mode="stream")
    async with client.post("/task", json=bad, headers=AUTH) as resp:
        assert resp.status == 500
        assert "not JSON-serialisable" in (await resp.json())["error"]


# --- the pieces, without a server ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "events"),
    [
        ("text/event-stream", True),
        ("text/html, Text/Event-Stream;q=0.9", True),
        ("application/json", False),
        ("text/event-streams", False),
        ("", False),
    ],
)
def test_wants_events_reads_the_accept_header(accept: str, events: bool) -> None:
    request = make_mocked_request("POST", "/task", headers={"Accept": accept} if accept else {})
    assert wants_events(request) is events


@given(st.binary(max_size=64) | st.text(max_size=32).map(str.encode))
def test_a_bytes_chunk_goes_out_as_the_utf8_of_its_text(chunk: bytes) -> None:
    expected = chunk_text(chunk).encode()
    assert plain_bytes(chunk) == expected
    assert plain_bytes(bytearray(chunk)) == expected


def test_an_ascii_bytes_chunk_is_sent_as_it_is() -> None:
    chunk = b"x" * 65536
    assert plain_bytes(chunk) is chunk  # no decoding, no copy


def test_chunk_text_keeps_text_decodes_bytes_and_writes_the_rest_as_json() -> None:
    assert chunk_text("line\n") == "line\n"
    assert chunk_text("é".encode()) == "é"
    assert chunk_text(bytearray(b"\xff")) == "\ufffd"  # undecodable bytes do not stop a stream
    assert json.loads(chunk_text({"n": [1, None]})) == {"n": [1, None]}
    with pytest.raises(NotJSON):
        chunk_text(float("nan"))


def test_event_frame_splits_lines_into_data_fields() -> None:
    assert event_frame("one") == b"data: one\n\n"
    assert event_frame("a\r\nb\rc\nd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"
    assert event_frame("{}", "end") == b"event: end\ndata: {}\n\n"
    assert event_frame("") == b"data: \n\n"
