"""The logging pipeline (worker/logs.py): cached loggers follow the level and the output set by
the latest `Logging.configure`, and lines are flushed once per loop turn."""

from __future__ import annotations

import asyncio
import io
import json

import structlog

from worker.logs import LogBuffer, Logging

_log = structlog.get_logger("tests.levels")


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

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


async def test_lines_written_in_one_loop_turn_are_flushed_once() -> None:
    output = CountingOutput()
    Logging(LogBuffer(10), output).configure("info", "json", [], {})
    for n in range(5):
        _log.info("line", n=n)
    assert output.flushes == 0
    await asyncio.sleep(0)
    assert output.flushes == 1
    assert lines(output) == ["line"] * 5


def test_lines_written_outside_the_loop_are_flushed_at_once() -> None:
    output = CountingOutput()
    Logging(LogBuffer(10), output).configure("info", "json", [], {})
    _log.info("from a thread or at startup")
    assert output.flushes == 1
