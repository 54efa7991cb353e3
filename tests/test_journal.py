"""The task journal on a real SQLite file, driven from a real event loop."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import ROOT, wait_for
from worker import journal as journal_module
from worker.journal import MIGRATIONS, Entry, Journal, JournalUnavailable


def entry(task_id: str, priority: int = 1, key: str | None = None, **fields: Any) -> Entry:
    return Entry(
        task_id=task_id,
        function="hello",
        params=fields.pop("params", {"name": "x"}),
        priority=priority,
        url="http://127.0.0.1:9/hook",
        headers={"Authorization": "secret"},
        idempotency_key=key,
        accepted_at=1000.0,
        **fields,
    )


def stop_deadline() -> float:
    return asyncio.get_running_loop().time() + 10


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    opened = Journal(tmp_path / "state" / "tasks.sqlite3", retention=3600)
    await opened.start()
    yield opened
    await opened.stop(stop_deadline())


def rows(path: Path) -> dict[str, tuple[Any, ...]]:
    """What another connection sees in the file: task_id -> (state, body, attempts, error)."""
    with sqlite3.connect(path) as other:
        found = other.execute("SELECT task_id, state, body, attempts, last_error FROM tasks")
        result = {row[0]: row[1:] for row in found}
    other.close()
    return result


def moved_aside(directory: Path) -> list[Path]:
    return list(directory.glob("tasks.sqlite3.corrupt-*"))


async def test_admit_returns_once_committed_and_the_file_is_private(journal: Journal) -> None:
    assert await journal.admit(entry("t1")) is None
    assert rows(journal.path) == {"t1": ("queued", None, 0, None)}
    for suffix in ("", "-wal", "-shm"):
        assert stat.S_IMODE(os.stat(f"{journal.path}{suffix}").st_mode) == 0o600
    [kept] = await journal.resumable()
    assert kept.params == {"name": "x"} and kept.headers == {"Authorization": "secret"}
    assert kept.seq > 0 and kept.state == "queued"


async def test_admits_in_one_loop_turn_share_one_transaction(journal: Journal) -> None:
    before = journal.commits
    results = await asyncio.gather(*(journal.admit(entry(f"t{n}")) for n in range(50)))
    assert results == [None] * 50
    assert journal.commits == before + 1
    assert len(rows(journal.path)) == 50
    await journal.admit(entry("later"))
    assert journal.commits == before + 2


async def test_what_comes_while_the_writer_is_busy_goes_into_one_commit(
    journal: Journal,
) -> None:
    """Group commit across loop turns: under load a turn hands over a few changes, and a
    transaction for each was most of the journal's cost."""
    entered, disk = threading.Event(), threading.Event()
    held = asyncio.ensure_future(journal._call(lambda conn: (entered.set(), disk.wait(10))))
    await wait_for(entered.is_set)  # the writer is inside that transaction
    before = journal.commits
    admits = []
    for n in range(5):  # five loop turns, five batches handed over
        admits.append(asyncio.ensure_future(journal.admit(entry(f"t{n}"))))
        await wait_for(lambda n=n: journal._batches.qsize() == n + 1)
    disk.set()
    await held
    assert await asyncio.gather(*admits) == [None] * 5
    assert journal.commits == before + 2  # the held one, then the five batches in one
    assert len(rows(journal.path)) == 5


async def test_every_state_change(journal: Journal) -> None:
    await journal.admit(entry("t"))
    journal.running("t")
    assert [e.state for e in await journal.resumable()] == ["running"]
    journal.done("t", b'{"success": true}')
    [done] = await journal.resumable()
    assert (done.state, done.body) == ("done", b'{"success": true}')
    journal.attempted("t", 1, "503 Service Unavailable")
    [tried] = await journal.resumable()
    assert (tried.attempts, tried.last_error) == (1, "503 Service Unavailable")
    journal.dead("t", "gave up after 4 attempts", 4)
    [dead] = await journal.dead_letters()
    assert (dead.state, dead.attempts, dead.last_error) == ("dead", 4, "gave up after 4 attempts")
    assert dead.failed_at is not None and dead.body == b'{"success": true}'
    assert await journal.resumable() == [] and await journal.count_dead() == 1
    [again] = await journal.redeliver(["t"])
    assert (again.state, again.attempts, again.failed_at) == ("done", 4, None)
    journal.delivered("t")
    await journal.resumable()
    assert rows(journal.path) == {"t": ("delivered", None, 4, "gave up after 4 attempts")}
    assert journal.health()["journal"]["queued"] == 0


@pytest.mark.parametrize("durable", [True, False], ids=["file", "memory"])
async def test_a_task_that_runs_and_ends_in_one_batch_is_moved_once(
    tmp_path: Path, durable: bool
) -> None:
    """Its `running` row would be committed with its `done` and never read: one statement
    moves it from queued to done (a webhook no-op's usual path), with the same counts."""
    journal = Journal(tmp_path / "tasks.sqlite3" if durable else None, retention=3600)
    await journal.start()
    try:
        # With idempotency keys: in memory too, these tasks are rows.
        await journal.admit(entry("t", key="kt"))
        changed: int = await journal._call(lambda conn: conn.total_changes)
        journal.running("t")
        journal.done("t", b'{"success":true}')
        after: int = await journal._call(lambda conn: conn.total_changes)
        assert after - changed == 1
        [done] = await journal.resumable()
        assert (done.state, done.body) == ("done", b'{"success":true}')
        assert await counted(journal) == await truth(journal) == {"done": 1}
        await journal.admit(entry("u", key="ku"))
        journal.running("u")  # committed apart from its done, as a longer task's is
        await journal.committed()
        assert await counted(journal) == await truth(journal) == {"done": 1, "running": 1}
        journal.done("u", b"{}")
        assert await counted(journal) == await truth(journal) == {"done": 2}
    finally:
        await journal.stop(stop_deadline())


@pytest.fixture
async def in_memory() -> AsyncIterator[Journal]:
    opened = Journal(None, retention=3600)
    await opened.start()
    yield opened
    await opened.stop(stop_deadline())


async def statements(journal: Journal) -> int:
    """Rows changed in the memory database so far, once what is submitted is written."""
    changed: int = await journal._call(lambda conn: conn.total_changes)
    return changed


async def test_in_memory_a_task_without_a_key_writes_nothing_until_it_is_dead(
    in_memory: Journal,
) -> None:
    journal = in_memory
    for n in range(3):
        assert await journal.admit(entry(f"t{n}")) is None
    journal.running("t0")
    journal.done("t0", b"{}")
    journal.attempted("t0", 1, "HTTP 503")
    journal.running("t1")
    assert await counted(journal) == {"queued": 1, "running": 1, "done": 1}
    journal.delivered("t0")
    journal.forget("t2")  # refused after all: its queue was full
    assert await counted(journal) == {"running": 1}
    assert await statements(journal) == 0
    assert await journal.dead_letters() == []
    journal.done("t1", b'{"success":false}')
    journal.dead("t1", "HTTP 503", 4)
    assert await counted(journal) == await truth(journal) == {"dead": 1}
    [dead] = await journal.dead_letters()
    assert (dead.task_id, dead.state, dead.body, dead.attempts, dead.last_error) == (
        "t1",
        "dead",
        b'{"success":false}',
        4,
        "HTTP 503",
    )
    assert (dead.params, dead.headers, dead.url) == (
        {"name": "x"},
        {"Authorization": "secret"},
        "http://127.0.0.1:9/hook",
    )
    assert await statements(journal) == 1  # the dead letter's row, and nothing before it


async def test_in_memory_dead_letters_keep_admission_order_and_can_be_redelivered(
    in_memory: Journal,
) -> None:
    journal = in_memory
    await journal.admit(entry("a"))
    await journal.admit(entry("b", key="kb"))  # a row from the start
    await journal.admit(entry("c"))
    await journal.admit(entry("d", priority=0))
    for task_id in ("c", "b", "d", "a"):  # they die in another order
        journal.done(task_id, task_id.encode())
        journal.dead(task_id, "refused", 2)
    assert [e.task_id for e in await journal.dead_letters()] == ["d", "a", "b", "c"]
    again = await journal.redeliver(["a", "c"])
    assert [(e.task_id, e.state, e.body) for e in again] == [
        ("a", "done", b"a"),
        ("c", "done", b"c"),
    ]
    journal.delivered("a")
    journal.dead("c", "refused again", 4)
    assert await counted(journal) == await truth(journal) == {"dead": 3}
    assert [e.task_id for e in await journal.dead_letters()] == ["d", "b", "c"]


async def test_in_memory_an_id_in_use_held_or_as_a_row_is_refused_a_delivered_held_one_is_free(
    in_memory: Journal,
) -> None:
    journal = in_memory
    await journal.admit(entry("t"))
    with pytest.raises(JournalUnavailable):
        await journal.admit(entry("t"))
    with pytest.raises(JournalUnavailable):
        await journal.admit(entry("t", key="k"))  # a row may not take a held task's id either
    assert await counted(journal) == {"queued": 1}
    journal.done("t", b"{}")
    journal.delivered("t")
    assert await journal.admit(entry("t")) is None  # nothing keeps a delivered task in memory
    await journal.admit(entry("r", key="kr"))
    journal.done("r", b"{}")
    journal.delivered("r")  # its row stays for webhook.retention
    await journal.committed()
    with pytest.raises(JournalUnavailable):
        await journal.admit(entry("r"))  # held, it could never be written as a dead letter
    await journal.stop(stop_deadline())
    with pytest.raises(JournalUnavailable):
        await journal.admit(entry("u"))


async def test_in_memory_a_dead_letters_id_is_refused_until_it_is_purged() -> None:
    """The rows are counted: every way a row comes (a key, a dead letter) or goes (purge,
    forget, expiry) keeps the refusals right while SQLite is asked only when a row exists."""
    journal = Journal(None, retention=0)  # a delivered row expires at the next clean-up
    await journal.start()
    try:
        for task_id in ("a", "b"):
            await journal.admit(entry(task_id))
            journal.done(task_id, b"{}")
            journal.dead(task_id, "HTTP 503", 4)
        await journal.admit(entry("k", key="kk"))
        await journal.committed()
        for task_id in ("a", "b", "k"):
            with pytest.raises(JournalUnavailable):
                await journal.admit(entry(task_id))
        assert await journal.purge(["a"]) == 1
        assert await journal.admit(entry("a")) is None  # its row is gone: the id is free
        with pytest.raises(JournalUnavailable):
            await journal.admit(entry("b"))  # the other dead letter still holds its id
        journal.done("k", b"{}")
        journal.delivered("k")
        assert await journal.cleanup() == 1
        assert await journal.admit(entry("k")) is None
        assert await journal.purge(None) == 1
        asked: list[str] = []
        assert journal._conn is not None
        journal._conn.set_trace_callback(asked.append)
        assert await journal.admit(entry("b")) is None
        assert asked == []  # no row is left: nothing to ask
    finally:
        await journal.stop(stop_deadline())


async def test_in_memory_a_task_without_a_key_asks_sqlite_only_when_a_row_exists(
    in_memory: Journal,
) -> None:
    journal = in_memory
    asked: list[str] = []
    assert journal._conn is not None
    journal._conn.set_trace_callback(asked.append)
    await journal.admit(entry("t0"))
    assert asked == []
    await journal.admit(entry("k", key="kk"))
    await journal.committed()
    asked.clear()
    await journal.admit(entry("t1"))
    assert asked == ["SELECT 1 FROM tasks WHERE task_id = 't1'"]
    journal.forget("k")
    await journal.committed()
    asked.clear()
    await journal.admit(entry("t2"))
    assert asked == []  # the row is gone, and so is the question


async def test_a_finished_task_does_not_go_back_to_running(journal: Journal) -> None:
    await journal.admit(entry("t"))
    journal.done("t", b"{}")
    journal.running("t")
    assert [e.state for e in await journal.resumable()] == ["done"]


async def test_resumable_in_priority_then_admission_order(journal: Journal) -> None:
    for task_id, priority in [("a", 5), ("b", 1), ("c", 5), ("d", 1), ("e", 3)]:
        await journal.admit(entry(task_id, priority))
    journal.running("b")
    journal.done("c", b"{}")
    journal.delivered("d")
    journal.dead("e", "gone", 4)
    assert [e.task_id for e in await journal.resumable()] == ["b", "a", "c"]


async def test_dead_letters_redeliver_and_purge(journal: Journal) -> None:
    for n in range(4):
        await journal.admit(entry(f"t{n}"))
        journal.done(f"t{n}", b"{}")
        journal.dead(f"t{n}", "refused", 2)
    assert [e.task_id for e in await journal.dead_letters()] == ["t0", "t1", "t2", "t3"]
    assert [e.task_id for e in await journal.redeliver(["t1", "nope"])] == ["t1"]
    assert await journal.count_dead() == 3
    assert await journal.purge(["t0"]) == 1
    assert await journal.purge(["t1"]) == 0  # not dead any more: kept
    assert [e.task_id for e in await journal.redeliver(None)] == ["t2", "t3"]
    journal.dead("t2", "refused", 3)
    journal.dead("t3", "refused", 3)
    assert await journal.purge(None) == 2
    assert await journal.dead_letters() == []
    assert sorted(rows(journal.path)) == ["t1"]
    assert journal.health()["journal"]["dead"] == 0


async def test_a_known_idempotency_key_returns_the_first_entry(journal: Journal) -> None:
    assert await journal.admit(entry("first", key="k")) is None
    journal.dead("first", "refused", 1)
    same = await journal.admit(entry("second", key="k"))
    assert same is not None and (same.task_id, same.state) == ("first", "dead")
    both = await asyncio.gather(
        journal.admit(entry("x", key="j")), journal.admit(entry("y", key="j"))
    )
    assert both[0] is None and both[1] is not None and both[1].task_id == "x"
    await journal.purge(["first"])
    assert await journal.admit(entry("third", key="k")) is None  # a purged key is forgotten
    assert sorted(rows(journal.path)) == ["third", "x"]


async def counted(journal: Journal) -> dict[str, int]:
    """The counts the journal keeps, once everything submitted so far is written."""
    await journal.resumable()
    health = journal.health()["journal"]
    assert journal.dead_count == health["dead"]
    return {
        state: health[state] for state in ("queued", "running", "done", "dead") if health[state]
    }


async def truth(journal: Journal) -> dict[str, int]:
    """The same counts, counted in the rows themselves and, in memory, the tasks held."""
    sql = "SELECT state, count(*) FROM tasks WHERE state != 'delivered' GROUP BY state"
    found: dict[str, int] = await journal._call(lambda conn: dict(conn.execute(sql).fetchall()))
    for held in journal._held.values():
        found[held.state] = found.get(held.state, 0) + 1
    return found


@pytest.mark.parametrize("durable", [True, False], ids=["file", "memory"])
async def test_the_counts_follow_every_change_and_a_restart(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "tasks.sqlite3" if durable else None
    journal = Journal(path, retention=3600)
    await journal.start()
    expected: list[dict[str, int]] = []

    async def check() -> None:
        kept = await counted(journal)
        assert kept == await truth(journal)
        expected.append(kept)

    try:
        await asyncio.gather(*(journal.admit(entry(f"t{n}")) for n in range(8)))
        assert await journal.admit(entry("t8")) is None
        assert await journal.admit(entry("k1", key="k")) is None
        assert (await journal.admit(entry("k2", key="k"))) is not None  # nothing new
        await check()
        assert expected[-1] == {"queued": 10}
        for n in range(6):
            journal.running(f"t{n}")
        journal.running("t0")  # already running: no change
        await check()
        for n in range(5):
            journal.done(f"t{n}", b"{}")
        journal.done("t7", b"{}")  # straight from queued
        journal.running("t1")  # done does not go back to running
        await check()
        journal.delivered("t0")
        journal.delivered("t0")  # again: still one delivered
        journal.attempted("t1", 1, "HTTP 503")
        for n in (1, 2, 3):
            journal.dead(f"t{n}", "HTTP 503", 4)
        journal.dead("t5", "internal error", 0)  # from running
        journal.forget("t6")
        journal.forget("nope")
        await check()
        assert expected[-1] == {"queued": 2, "done": 2, "dead": 4}
        assert [e.task_id for e in await journal.redeliver(["t1", "t4"])] == ["t1"]
        await check()
        assert await journal.purge(["t2"]) == 1
        await check()
        assert await journal.purge(None) == 2
        await check()
        assert expected[-1] == {"queued": 2, "done": 3}
        if durable:
            await journal.stop(stop_deadline())
            journal = Journal(path, retention=3600)
            await journal.start()
            assert await counted(journal) == expected[-1]
            journal.delivered("t1")
            await check()
            assert expected[-1] == {"queued": 2, "done": 2}
    finally:
        await journal.stop(stop_deadline())


async def test_stop_writes_pending_state_changes(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "tasks.sqlite3", retention=3600)
    await journal.start()
    await journal.admit(entry("t"))
    await journal.admit(entry("u"))
    journal.running("t")
    journal.done("t", b"body")
    journal.attempted("t", 1, "timeout")
    journal.dead("u", "refused", 1)
    await journal.stop(stop_deadline())
    assert rows(journal.path) == {
        "t": ("done", b"body", 1, "timeout"),
        "u": ("dead", None, 1, "refused"),
    }


async def test_an_older_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    old.execute(
        "INSERT INTO tasks (task_id, function, params, priority, url, headers, state, accepted_at)"
        " VALUES ('old', 'hello', '{}', 1, 'http://h/', '{}', 'queued', 1.0)"
    )
    old.close()
    journal = Journal(path, retention=3600)
    await journal.start()
    try:
        assert [e.task_id for e in await journal.resumable()] == ["old"]
        await journal.admit(entry("a", key="k"))
        assert (await journal.admit(entry("b", key="k"))) is not None  # the index of version 2
    finally:
        await journal.stop(stop_deadline())
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    check.close()


async def test_a_newer_schema_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    newer.close()
    with pytest.raises(RuntimeError, match="newer than this worker"):
        await Journal(path, retention=3600).start()


async def test_a_corrupt_file_is_moved_aside_and_a_fresh_one_works(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    journal = Journal(path, retention=3600)
    with capture_logs() as logged:
        await journal.start()
    try:
        [aside] = moved_aside(tmp_path)
        assert aside.read_bytes() == garbage
        [line] = [e for e in logged if e["log_level"] == "error"]
        assert line["moved_to"] == str(aside) and "corrupt" in line["event"]
        assert await journal.admit(entry("t")) is None
        assert [e.task_id for e in await journal.resumable()] == ["t"]
    finally:
        await journal.stop(stop_deadline())


async def test_a_directory_that_cannot_be_made_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "tasks.sqlite3"
    with pytest.raises(OSError, match=f"cannot open task journal {path}"):
        await Journal(path, retention=3600).start()


async def test_a_full_journal_answers_unavailable_then_recovers(journal: Journal) -> None:
    """The failure is SQLite's own SQLITE_FULL ("database or disk is full"), caused by capping
    the writer connection's file size with PRAGMA max_page_count."""

    def cap(pages: int | None) -> Any:
        def op(conn: sqlite3.Connection) -> Any:
            limit = pages or conn.execute("PRAGMA page_count").fetchone()[0]
            return conn.execute(f"PRAGMA max_page_count = {limit}").fetchall()

        return op

    await journal.admit(entry("before"))
    await journal._call(cap(None))
    big = {"blob": "x" * 200_000}
    with capture_logs() as logged:
        for n in range(3):
            with pytest.raises(JournalUnavailable, match="full"):
                await journal.admit(entry(f"lost{n}", params=big))
        journal.running("before")  # fails with its group, held back and written later
        with pytest.raises(JournalUnavailable, match="full"):
            await journal.admit(entry("lost3", params=big))
        assert "full" in journal.health()["journal"]["lastError"]
        await journal._call(cap(1_000_000))
        assert await journal.admit(entry("after", params=big)) is None
    assert [e["event"] for e in logged] == [
        "task journal cannot be written",
        "task journal is writable again",
    ]
    assert journal.health()["journal"]["lastError"] is None
    assert rows(journal.path) == {
        "before": ("running", None, 0, None),
        "after": ("queued", None, 0, None),
    }
    # What failed with its group is counted once, when written.
    assert await counted(journal) == await truth(journal) == {"running": 1, "queued": 1}


async def test_delivered_rows_expire_and_the_file_stops_growing(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "tasks.sqlite3", retention=0)
    await journal.start()
    sizes = []
    try:
        for round_ in range(8):
            ids = [f"r{round_}-{n}" for n in range(200)]
            await asyncio.gather(*(journal.admit(entry(i, params={"p": "x" * 2000})) for i in ids))
            for task_id in ids:
                journal.done(task_id, b"y" * 2000)
                journal.delivered(task_id)
            assert await journal.cleanup() == 200
            sizes.append(journal.path.stat().st_size)
    finally:
        await journal.stop(stop_deadline())
    assert rows(journal.path) == {}
    assert max(sizes[2:]) <= max(sizes[:2]), sizes


async def test_delivered_rows_within_retention_are_kept(journal: Journal) -> None:
    await journal.admit(entry("t"))
    journal.delivered("t")
    assert await journal.cleanup() == 0
    assert sorted(rows(journal.path)) == ["t"]


async def test_a_damaged_page_fails_the_check_and_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    journal = Journal(path, retention=3600)
    await journal.start()
    await asyncio.gather(
        *(journal.admit(entry(f"t{n}", params={"p": "x" * 500})) for n in range(200))
    )
    await journal.stop(stop_deadline())
    damage(path)
    again = Journal(path, retention=3600)
    with capture_logs() as logged:
        await again.start()
    try:
        assert len(moved_aside(tmp_path)) == 1
        assert [e["event"] for e in logged if e["log_level"] == "error"] == [
            "task journal is corrupt; moved aside, starting a fresh one"
        ]
        assert await again.resumable() == []
    finally:
        await again.stop(stop_deadline())


def damage(path: Path) -> None:
    """Overwrite the pages after the first (the header stays valid, the b-trees do not)."""
    with path.open("r+b") as file:
        file.seek(4096 * 2)
        file.write(b"\xa5" * 4096 * 4)


async def test_the_writer_removes_expired_rows_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "CLEANUP_EVERY", 0.05)
    journal = Journal(tmp_path / "tasks.sqlite3", retention=0)
    await journal.start()
    try:
        await journal.admit(entry("t"))
        journal.delivered("t")
        await wait_for(lambda: rows(journal.path) == {})
    finally:
        await journal.stop(stop_deadline())


FULL_DISK_SCRIPT = """
import asyncio, json, sys, time
from pathlib import Path
from worker.journal import Entry, Journal, JournalUnavailable

def entry(task_id):
    return Entry(task_id=task_id, function="hello", params={"p": "x" * 100_000}, priority=1,
                 url="http://h/", headers={}, idempotency_key=None, accepted_at=time.time())

async def main(directory):
    journal = Journal(directory / "tasks.sqlite3", retention=3600)
    await journal.start()
    await journal.admit(entry("before"))
    filler = directory / "filler"
    try:
        with filler.open("wb") as file:
            while True:
                file.write(b"f" * 4096)
                file.flush()
    except OSError:
        pass
    errors = []
    for n in range(3):
        try:
            await journal.admit(entry(f"lost{n}"))
        except JournalUnavailable as exc:
            errors.append(str(exc))
    filler.unlink()
    after = await journal.admit(entry("after"))
    kept = [e.task_id for e in await journal.resumable()]
    await journal.stop(asyncio.get_running_loop().time() + 5)
    print(json.dumps({"errors": errors, "after": after, "kept": kept}))

asyncio.run(main(Path(sys.argv[1])))
"""


def test_a_full_disk_answers_unavailable_then_recovers(tmp_path: Path) -> None:
    """A real ENOSPC: the journal on a 1 MiB tmpfs mounted in a private mount namespace."""
    mount = tmp_path / "small"
    mount.mkdir()
    command = f'mount -t tmpfs -o size=1m,mode=700 tmpfs {mount} && exec "$0" -c "$1" {mount}'
    try:
        ran = subprocess.run(
            ["unshare", "-m", "sh", "-c", command, sys.executable, FULL_DISK_SCRIPT],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    except FileNotFoundError:
        pytest.skip("no unshare")
    if ran.returncode != 0 and ("unshare" in ran.stderr or "mount" in ran.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {ran.stderr.strip()}")
    assert ran.returncode == 0, ran.stderr
    outcome = json.loads(ran.stdout.splitlines()[-1])
    assert len(outcome["errors"]) == 3 and all("full" in e for e in outcome["errors"]), outcome
    assert outcome["after"] is None and outcome["kept"] == ["before", "after"]
    logged = ran.stdout.splitlines()[:-1]  # the log lines, then the outcome
    assert len(logged) == 2, logged
    assert "task journal cannot be written" in logged[0] and "disk is full" in logged[0]
    assert "task journal is writable again" in logged[1]


KILLED_SCRIPT = """
import asyncio, sys, time
from pathlib import Path
from worker.journal import Entry, Journal

async def main(path):
    journal = Journal(path, retention=3600)
    await journal.start()
    admits = [
        journal.admit(Entry(task_id=f"t{n}", function="hello", params={}, priority=1,
                            url="http://h/", headers={}, idempotency_key=None, accepted_at=0.0))
        for n in range(20)
    ]
    await asyncio.gather(*admits)
    journal.running("t0")
    await journal.resumable()  # the state change is committed once this read has run
    print("committed", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(Path(sys.argv[1])))
"""


def test_what_admit_committed_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_SCRIPT, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "committed\n"
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    found = rows(path)
    assert len(found) == 20 and found["t0"][0] == "running"
