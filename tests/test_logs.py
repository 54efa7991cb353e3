"""Unit tests of worker/logs.py: masking whole secrets only, the per-address throttle, and the
pipeline (cached loggers follow the level and output of the latest `Logging.configure`; lines
are flushed once per loop turn)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading

import structlog
from hypothesis import given
from hypothesis import strategies as st

from worker import jsoncodec
from worker.logs import MASK, JsonLine, LogBuffer, Logging, Masker, Throttle

_log = structlog.get_logger("tests.levels")


def test_a_one_letter_key_leaves_words_that_contain_the_letter_alone() -> None:
    mask = Masker(["k"])
    for line in ("task_id=3", "load balancer websocket listening", "kk", "key=kind"):
        assert mask(line) == line
    assert mask("key k here") == f"key {MASK} here"
    assert mask('{"auth": "k"}') == f'{{"auth": "{MASK}"}}'


def test_the_whole_key_is_masked_where_it_stands_alone() -> None:
    key = "s3cret-key-0123456789"
    mask = Masker([key])
    assert mask(f"Bearer {key}") == f"Bearer {MASK}"
    assert mask(f"key={key}, next") == f"key={MASK}, next"
    assert mask(f"[{key}]") == f"[{MASK}]"
    # Part of a longer token is another value: it is not the key, and it is left whole.
    assert mask(f"x{key}") == f"x{key}"


def test_a_key_inside_a_json_escaped_string_is_masked() -> None:
    key = 'we"ird\\key-0123456789'
    mask = Masker([key])
    once = json.dumps({"Token": key})
    twice = json.dumps({"log": once})
    assert key not in mask(once) and json.dumps(key)[1:-1] not in mask(once)
    assert MASK in mask(once)
    assert MASK in mask(twice) and json.dumps(json.dumps(key)[1:-1])[1:-1] not in mask(twice)


def test_authorization_values_are_masked_in_any_quoting() -> None:
    mask = Masker([])
    assert mask("Authorization: Bearer abc") == f"Authorization: Bearer {MASK}"
    assert mask("{'x-lb-auth': 'abc'}") == f"{{'x-lb-auth': '{MASK}'}}"
    escaped = '{\\"Authorization\\": \\"Bearer sometoken\\"}'
    assert "sometoken" not in mask(escaped)


@given(
    key=st.text(alphabet="abcdefghijk0123456789-_", min_size=1, max_size=20),
    text=st.text(alphabet="abcdefghijk0123456789 _-=:.,", max_size=80),
)
def test_masking_only_ever_replaces_the_key_itself(key: str, text: str) -> None:
    """What is masked, put back, gives the line again: nothing else was touched."""
    masked = Masker([key])(text)
    assert masked.replace(MASK, key) == text or MASK in text


def test_the_throttle_allows_a_line_a_second_per_key_and_counts_the_rest() -> None:
    now = [100.0]
    throttle = Throttle(every=1.0, keys=2, clock=lambda: now[0])
    assert throttle.allow("a") == 0
    assert [throttle.allow("a") for _ in range(5)] == [None] * 5
    assert throttle.allow("b") == 0  # another address has its own budget
    now[0] += 1.0
    assert throttle.allow("a") == 5
    assert throttle.allow("c") == 0  # a third key evicts the oldest one
    assert throttle.allow("b") == 0  # b was forgotten, so nothing is suppressed


# --- the pipeline ------------------------------------------------------------------------------


def lines(output: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in output.getvalue().splitlines()]


def test_a_reload_changes_the_level_of_cached_loggers() -> None:
    first = io.StringIO()
    logging_ = Logging(LogBuffer(10), first)
    logging_.configure("info", "json", ["s3cret"], {})
    bound = _log.bind(task_id="t")
    _log.debug("hidden")
    bound.info("shown")
    logging_.configure("debug", "json", ["s3cret"], {})
    _log.debug("now shown")
    bound.debug("bound now shown")
    assert bound.is_enabled_for(10)
    logging_.configure("warning", "json", ["s3cret"], {})
    _log.info("hidden again")
    bound.warning("warned s3cret")
    assert lines(first) == ["shown", "now shown", "bound now shown", "warned ***"]


def test_a_new_pipeline_takes_over_cached_loggers() -> None:
    old, new = io.StringIO(), io.StringIO()
    Logging(LogBuffer(10), old).configure("info", "json", [], {})
    _log.info("to old")
    buffer = LogBuffer(10)
    Logging(buffer, new).configure("info", "json", [], {})
    _log.info("to new")
    assert lines(old) == ["to old"]
    assert lines(new) == ["to new"]
    assert len(buffer.tail()) == 1


class CountingOutput(io.StringIO):
    flushes = 0
    writes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_written_in_one_loop_turn_are_flushed_once() -> None:
    output = CountingOutput()
    Logging(LogBuffer(10), output).configure("info", "json", [], {})
    for n in range(5):
        _log.info("line", n=n)
    assert (output.writes, output.flushes) == (0, 0)
    await asyncio.sleep(0)
    # One write: with PYTHONUNBUFFERED=1 (the units) each write to stdout is a system call.
    assert (output.writes, output.flushes) == (1, 1)
    assert lines(output) == ["line"] * 5


async def test_a_thread_line_is_written_at_once_while_loop_lines_wait() -> None:
    output = CountingOutput()
    Logging(LogBuffer(10), output).configure("info", "json", [], {})
    _log.info("on the loop")
    thread = threading.Thread(target=_log.info, args=("in a thread",))
    thread.start()
    thread.join(5)  # without yielding to the loop: its line still waits
    assert lines(output) == ["in a thread"]
    await asyncio.sleep(0)
    assert lines(output) == ["in a thread", "on the loop"]


async def test_stopping_the_logging_part_writes_the_waiting_lines() -> None:
    output = CountingOutput()
    part = Logging(LogBuffer(10), output)
    part.configure("info", "json", [], {})
    _log.info("last words")
    await part.stop(0)
    assert lines(output) == ["last words"]


def test_lines_written_outside_the_loop_are_flushed_at_once() -> None:
    output = CountingOutput()
    Logging(LogBuffer(10), output).configure("info", "json", [], {})
    _log.info("from a thread or at startup")
    assert output.flushes == 1


def _structlog_chain() -> list[object]:
    """The json chain JsonLine stands for, as structlog's own processors."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=jsoncodec.dumps_log),
    ]


def test_the_one_step_json_line_writes_what_structlogs_chain_writes() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        failure = exc
    events = [
        ("info", {"task_id": "t", "function": "f", "outcome": "succeeded", "event": "task"}),
        ("warn", {"event": "w", "n": 1.5, "odd": object.__new__(Throttle)}),
        ("exception", {"event": "e", "exc_info": failure}),
        ("error", {"event": "e", "exc_info": None, "stack_info": False}),
    ]
    structlog.contextvars.bind_contextvars(request="r-1")
    try:
        for method, event in events:
            ours = json.loads(JsonLine()(None, method, dict(event)))
            theirs = dict(event)
            for step in _structlog_chain():
                theirs = step(None, method, theirs)  # type: ignore[operator]
            expected = json.loads(theirs)  # type: ignore[arg-type]
            assert list(ours) == list(expected)
            stamp = ours.pop("timestamp")
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp)
            expected.pop("timestamp")
            if "odd" in expected:  # a repr names the object's address
                assert ours.pop("odd").startswith("<worker.logs.Throttle object")
                expected.pop("odd")
            assert ours == expected
    finally:
        structlog.contextvars.clear_contextvars()
