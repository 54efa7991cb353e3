"""The durable store of webhook-mode tasks: `<state_dir>/tasks.sqlite3`.

One thread owns the SQLite connection, so the event loop never waits on the disk. Everything
submitted during one event-loop turn is written in one transaction (group commit): `admit`
returns once its group is committed, the state changes are fire-and-forget but applied in order.

Durability: WAL with `synchronous=NORMAL`. A committed transaction survives a crash or kill -9
of the process; an OS crash or power loss may lose the last few commits (never corrupt the file).

When a group cannot be committed (disk full, read-only, I/O error), its admits raise
JournalUnavailable, the cause is logged once per outage, and its state changes are kept and tried
again before anything newer. A file that is not a database or fails `quick_check` at start is
moved aside and a fresh one begun; a path that cannot be opened at all fails `start()`.

Without a `state_dir` the journal lives in memory and its statements run on the event loop; a
task without an idempotency key is then held as a record and written only if it becomes a dead
letter, the one state read back (nothing else would ever read its row).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import structlog

from worker.jsoncodec import dumps_answer
from worker.parts import Part

_log = structlog.get_logger("worker.journal")

State = Literal["queued", "running", "done", "delivered", "dead"]
Op = Callable[[sqlite3.Connection], Any]

CLEANUP_EVERY = 60.0  # seconds between removals of delivered rows past their retention
RETRY_EVERY = 1.0  # seconds between tries of state changes a write failure held back

# Applied in order; the database's `PRAGMA user_version` is how many have been applied.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL UNIQUE,
        function TEXT NOT NULL,
        params TEXT NOT NULL,
        priority INTEGER NOT NULL,
        url TEXT NOT NULL,
        headers TEXT NOT NULL,
        idempotency_key TEXT,
        state TEXT NOT NULL,
        body BLOB,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        accepted_at REAL NOT NULL,
        failed_at REAL,
        delivered_at REAL
    );
    CREATE INDEX tasks_by_state ON tasks (state, priority, seq);
    """,
    """
    CREATE UNIQUE INDEX tasks_by_idempotency_key ON tasks (idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
]


class Entry(NamedTuple):
    """One journaled webhook task. `seq` (admission order) is given by the journal.

    A NamedTuple (made with keywords): every webhook task makes one as it is accepted, and a
    frozen dataclass of these fourteen fields took four times as long to build."""

    task_id: str
    function: str
    params: dict[str, Any]
    priority: int
    url: str
    headers: dict[str, str]  # the task's own webhook headers: may hold credentials
    idempotency_key: str | None
    accepted_at: float
    seq: int = 0
    state: State = "queued"
    body: bytes | None = None  # the exact delivery body once done
    attempts: int = 0
    last_error: str | None = None
    failed_at: float | None = None


class JournalUnavailable(Exception):
    """The journal cannot be written now; the caller answers 503."""


_FIELDS = list(Entry._fields)
_COLUMNS = ", ".join(_FIELDS)  # the columns that make an Entry, in its fields' order


def _stored(entry: Entry) -> tuple[str, str]:
    """An entry's params and headers as their columns hold them (what `_entry` reads back)."""
    return dumps_answer(entry.params).decode(), dumps_answer(entry.headers).decode()


def _entry(row: tuple[Any, ...]) -> Entry:
    values = dict(zip(_FIELDS, row, strict=True))
    values["params"], values["headers"] = (
        json.loads(values["params"]),
        json.loads(values["headers"]),
    )
    return Entry(**values)


# The counts kept: a delivered row only waits for its retention.
COUNTED: tuple[State, ...] = ("queued", "running", "done", "dead")
# Beside the states in the counts, in memory only (its table starts empty, and only the memory
# journal asks whether an id is a row's): the rows in the table, whatever their state.
ROWS = "rows"
ALL_STATES: tuple[State, ...] = ("done", "running", "queued", "dead", "delivered")


@dataclass(frozen=True, slots=True)
class _Move:
    """One fixed statement moving a task to `target` from `source` (and setting more columns):
    the rows it changes tell how the counts change, with no need to count again."""

    source: State
    target: State
    sql: str


def _nothing(conn: sqlite3.Connection) -> None:
    return None


class _Held:
    """A task the in-memory journal keeps out of SQLite: its entry, its admission order and
    what a dead letter's row needs."""

    __slots__ = ("attempts", "body", "entry", "last_error", "seq", "state")

    def __init__(self, entry: Entry, seq: int) -> None:
        self.entry = entry
        self.seq = seq
        self.state: State = "queued"
        self.body: bytes | None = None
        self.attempts = 0
        self.last_error: str | None = None


def _moves(target: State, assignments: str, sources: tuple[State, ...]) -> tuple[_Move, ...]:
    """The statements that move a task to `target` from each state it may leave, the
    likeliest first: the first that changes a row is the last tried."""
    return tuple(
        _Move(
            source,
            target,
            f"UPDATE tasks SET state = '{target}'{assignments}"
            f" WHERE task_id = ? AND state = '{source}'",
        )
        for source in sources
    )


_TO_RUNNING = _moves("running", "", ("queued",))
_TO_DONE = _moves("done", ", body = ?", ("running", "queued"))
_QUEUED_TO_DONE = _moves("done", ", body = ?", ("queued", "running"))
_TO_DELIVERED = _moves("delivered", ", body = NULL, delivered_at = ?", ALL_STATES)
_TO_DEAD = _moves("dead", ", last_error = ?, attempts = ?, failed_at = ?", ALL_STATES)
_ATTEMPTED = "UPDATE tasks SET attempts = ?, last_error = ? WHERE task_id = ?"
_INSERT_DEAD = (
    "INSERT INTO tasks (seq, task_id, function, params, priority, url, headers, body,"
    " attempts, last_error, accepted_at, failed_at, state)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'dead')"
)


def _ids_clause(task_ids: list[str] | None) -> tuple[str, list[str]]:
    if task_ids is None:
        return "", []
    return f" AND task_id IN ({','.join('?' * len(task_ids))})", list(task_ids)


class Journal(Part):
    """The webhook tasks, from admission until delivered (kept `retention` seconds) or dead."""

    name = "task journal"

    def __init__(self, path: Path | None, retention: float) -> None:
        self.path = path  # None: in memory, for as long as the process lives (not durable)
        self.retention = retention
        self.commits = 0  # transactions committed by the writer (tests count group commits)
        self.last_error: str | None = None
        self._counts: dict[str, int] = {}  # by state; replaced whole, read from the loop
        self._changes: dict[str, int] = {}  # the writer's: the open transaction's count changes
        self._pending: list[tuple[Op, asyncio.Future[Any] | None]] = []
        # Tasks whose `running` change is in _pending: its place there, and the change.
        self._running: dict[str, tuple[int, Op]] = {}
        self._batches: queue.Queue[list[tuple[Op, asyncio.Future[Any] | None]] | None]
        self._batches = queue.Queue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._vacuum_due = False  # writer thread only: rows deleted since the last vacuum
        self._unwritten: list[Op] = []  # writer thread only: state changes a failure held back
        self._cleanup: asyncio.TimerHandle | None = None  # in memory: the retention timer
        # In memory: tasks held as records until they are dead letters, and the last `seq`
        # given (a held task's row is written out of admission order, with its own).
        self._held: dict[str, _Held] = {}
        self._seq = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (moving a corrupt file aside), migrate, remove expired rows, start the writer."""
        self._loop = asyncio.get_running_loop()
        if self.path is None:
            # In memory nothing waits on a disk: the statements run on the event loop itself,
            # where they cost less than the hop to a writer thread and back.
            self._conn = self._open()
            self._count(self._conn)
            self._cleanup = self._loop.call_later(CLEANUP_EVERY, self._clean_up_in_memory)
            return
        opened: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(opened,), name="journal")
        self._thread.daemon = True  # a stuck disk must not keep the process alive past stop()
        self._thread.start()
        try:
            await opened
        except BaseException:
            self._thread = None  # the writer has ended: nothing may wait on it
            raise

    async def stop(self, deadline: float) -> None:
        """Write what is pending, then close; never raises."""
        if self.path is None and self._conn is not None:
            self._flush()
            if self._cleanup is not None:
                self._cleanup.cancel()
            self._held.clear()
            self._conn.close()
            self._conn = None
            return
        if self._thread is None:
            return
        self._flush()
        self._batches.put(None)
        assert self._loop is not None
        timeout = max(0.0, deadline - self._loop.time())
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            _log.error("task journal did not finish writing by the deadline", path=str(self.path))
        self._thread = None

    @property
    def dead_count(self) -> int:
        """Dead letters kept now."""
        return self._counts.get("dead", 0)

    def health(self) -> dict[str, Any]:
        counts = self._counts
        return {
            "webhooks": {"dead": counts.get("dead", 0)},
            "journal": {
                "path": str(self.path) if self.path is not None else "memory",
                "queued": counts.get("queued", 0),
                "running": counts.get("running", 0),
                "done": counts.get("done", 0),
                "dead": counts.get("dead", 0),
                "lastError": self.last_error,
            },
        }

    # -- writes -----------------------------------------------------------------------------

    async def admit(self, entry: Entry) -> Entry | None:
        """Journal a new queued task and return once committed; when its idempotency key is
        already known, write nothing and return the existing entry. In memory, a task without
        a key is held, and admitted at once."""
        seq: int | None = None  # on file, SQLite's AUTOINCREMENT gives it
        if self.path is None:
            if not self._is_open:
                raise JournalUnavailable("the task journal is not open")
            if entry.task_id in self._held or (
                entry.idempotency_key is None and self._is_a_row(entry.task_id)
            ):
                # (A row refuses a held task's id too, by its UNIQUE constraint.)
                raise JournalUnavailable("task journal refused the task: its id is in use")
            self._seq = seq = self._seq + 1
            if entry.idempotency_key is None:
                self._held[entry.task_id] = _Held(entry, seq)
                self._count_held("queued", 1)
                return None
        params, headers = _stored(entry)

        def op(conn: sqlite3.Connection) -> Entry | None:
            if entry.idempotency_key is not None:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM tasks WHERE idempotency_key = ?",
                    (entry.idempotency_key,),
                ).fetchone()
                if row is not None:
                    return _entry(row)
            conn.execute(
                "INSERT INTO tasks (seq, task_id, function, params, priority, url, headers,"
                " idempotency_key, state, accepted_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                (
                    seq,
                    entry.task_id,
                    entry.function,
                    params,
                    entry.priority,
                    entry.url,
                    headers,
                    entry.idempotency_key,
                    entry.accepted_at,
                ),
            )
            self._changed("queued", 1)
            self._changed(ROWS, 1)
            return None

        result: Entry | None = await self._call(op)
        return result

    def running(self, task_id: str) -> None:
        held = self._held.get(task_id)
        if held is not None:
            if held.state == "queued":
                self._move_held(held, "running")
            return
        op = self._move(_TO_RUNNING, task_id)
        if op is not None:
            self._running[task_id] = (len(self._pending) - 1, op)

    def done(self, task_id: str, body: bytes) -> None:
        held = self._held.get(task_id)
        if held is not None:
            if held.state in ("queued", "running"):
                self._move_held(held, "done")
                held.body = body
            return
        at, op = self._running.pop(task_id, (-1, None))
        if op is not None and self._pending[at][0] is op:
            # It ran and ended within one batch, which commits whole: its `running` row would
            # never be read, so one statement moves it from queued (most webhook tasks).
            self._pending[at] = (_nothing, None)
            self._move(_QUEUED_TO_DONE, task_id, body)
        else:
            self._move(_TO_DONE, task_id, body)

    def attempted(self, task_id: str, attempts: int, error: str | None) -> None:
        held = self._held.get(task_id)
        if held is not None:
            held.attempts, held.last_error = attempts, error
            return
        self._submit(lambda conn: conn.execute(_ATTEMPTED, (attempts, error, task_id)), None)

    async def committed(self) -> None:
        """Return once every change submitted before this call is committed (they are applied
        in order); JournalUnavailable when they could not be."""
        await self._call(_nothing)

    def delivered(self, task_id: str) -> None:
        if self._let_go(task_id) is None:
            self._move(_TO_DELIVERED, task_id, time.time())

    def dead(self, task_id: str, error: str, attempts: int) -> None:
        held = self._let_go(task_id)
        if held is None:
            self._move(_TO_DEAD, task_id, error, attempts, time.time())
            return
        entry = held.entry
        params, headers = _stored(entry)
        row = (
            *(held.seq, entry.task_id, entry.function, params, entry.priority, entry.url),
            *(headers, held.body, attempts, error, entry.accepted_at, time.time()),
        )

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_INSERT_DEAD, row)
            self._changed("dead", 1)
            self._changed(ROWS, 1)

        self._submit(op, None)

    def forget(self, task_id: str) -> None:
        """Remove a task admitted here but refused after all (its queue was full)."""
        if self._let_go(task_id) is not None:
            return

        def op(conn: sqlite3.Connection) -> None:
            sql = "DELETE FROM tasks WHERE task_id = ? RETURNING state"
            for (state,) in conn.execute(sql, (task_id,)).fetchall():
                self._changed(state, -1)
                self._changed(ROWS, -1)

        self._submit(op, None)

    @property
    def durable(self) -> bool:
        return self.path is not None

    def _is_a_row(self, task_id: str) -> bool:
        """In memory: whether a row (a task with a key, or a dead letter) has this id. A held
        task taking it could never become a dead letter: its row would break the UNIQUE.
        With no row written (no keys, no dead letters: the usual case) SQLite is not asked; a
        statement per accept costs several microseconds once its code is out of the cache."""
        if not self._counts.get(ROWS):
            return False
        assert self._conn is not None
        found = self._conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,))
        return found.fetchone() is not None

    def _count_held(self, state: State, by: int) -> None:
        # In memory the counts are only ever touched on the loop: changed in place.
        self._counts[state] = self._counts.get(state, 0) + by

    def _move_held(self, held: _Held, target: State) -> None:
        self._count_held(held.state, -1)
        self._count_held(target, 1)
        held.state = target

    def _let_go(self, task_id: str) -> _Held | None:
        """A held task leaves the memory (delivered, dead or forgotten); None if not held."""
        held = self._held.pop(task_id, None)
        if held is not None:
            self._count_held(held.state, -1)
        return held

    def _move(self, moves: tuple[_Move, ...], task_id: str, *values: Any) -> Op | None:
        """Submit the change; it, or None when the journal is not open."""

        def op(conn: sqlite3.Connection) -> None:
            for move in moves:
                if conn.execute(move.sql, (*values, task_id)).rowcount:
                    self._changed(move.source, -1)
                    self._changed(move.target, 1)
                    return

        return op if self._submit(op, None) else None

    async def redeliver(self, task_ids: list[str] | None) -> list[Entry]:
        """Dead letters (all when None) back to done, attempts kept; returns them."""
        clause, args = _ids_clause(task_ids)

        def op(conn: sqlite3.Connection) -> list[Entry]:
            where = f"WHERE state = 'dead'{clause}"
            found = conn.execute(
                f"SELECT {_COLUMNS} FROM tasks {where} ORDER BY priority, seq", args
            )
            entries = [_entry(row)._replace(state="done", failed_at=None) for row in found]
            moved: int = conn.execute(
                f"UPDATE tasks SET state = 'done', failed_at = NULL {where}", args
            ).rowcount
            self._changed("dead", -moved)
            self._changed("done", moved)
            return entries

        result: list[Entry] = await self._call(op)
        return result

    async def purge(self, task_ids: list[str] | None) -> int:
        """Remove dead letters (all when None); returns how many."""
        clause, args = _ids_clause(task_ids)

        def op(conn: sqlite3.Connection) -> int:
            removed: int = conn.execute(
                f"DELETE FROM tasks WHERE state = 'dead'{clause}", args
            ).rowcount
            self._vacuum_due = self._vacuum_due or removed > 0
            self._changed("dead", -removed)
            self._changed(ROWS, -removed)
            return removed

        removed: int = await self._call(op)
        return removed

    async def cleanup(self) -> int:
        """Remove delivered rows past their retention now (the writer also does it every
        minute); returns how many."""
        removed: int = await self._call(self._expire)
        return removed

    # -- reads ------------------------------------------------------------------------------

    async def resumable(self) -> list[Entry]:
        """Queued, running and done tasks, in the order to resume them: priority, then seq."""
        return await self._select("state IN ('queued', 'running', 'done')")

    async def dead_letters(self) -> list[Entry]:
        return await self._select("state = 'dead'")

    async def count_dead(self) -> int:
        sql = "SELECT count(*) FROM tasks WHERE state = 'dead'"
        count: int = await self._call(lambda conn: conn.execute(sql).fetchone()[0])
        return count

    async def _select(self, condition: str) -> list[Entry]:
        sql = f"SELECT {_COLUMNS} FROM tasks WHERE {condition} ORDER BY priority, seq"
        entries: list[Entry] = await self._call(
            lambda conn: [_entry(row) for row in conn.execute(sql)]
        )
        return entries

    # -- the event loop's side of the writer ------------------------------------------------

    @property
    def _is_open(self) -> bool:
        return self._thread is not None or (self.path is None and self._conn is not None)

    async def _call(self, op: Op) -> Any:
        if self._loop is None or not self._is_open:
            raise JournalUnavailable("the task journal is not open")
        future = self._loop.create_future()
        self._submit(op, future)
        return await future

    def _submit(self, op: Op, future: asyncio.Future[Any] | None) -> bool:
        if self._loop is None or not self._is_open:
            _log.error("task journal is not open; a state change is lost", path=str(self.path))
            return False
        if not self._pending:
            self._loop.call_soon(self._flush)  # after everything else this turn submits
        self._pending.append((op, future))
        return True

    def _flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._running.clear()
            if self.path is None:
                self._write(batch)
            else:
                self._batches.put(batch)

    def _clean_up_in_memory(self) -> None:
        assert self._loop is not None
        self._submit(self._expire, None)
        self._cleanup = self._loop.call_later(CLEANUP_EVERY, self._clean_up_in_memory)

    def _settle(self, future: asyncio.Future[Any], result: Any) -> None:
        if future.cancelled():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    # -- the writer thread ------------------------------------------------------------------

    def _run(self, opened: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            self._conn = self._open()
            self._expire(self._conn)
            self._vacuum(self._conn)
            self._count(self._conn)
        except BaseException as exc:
            self._loop.call_soon_threadsafe(self._settle, opened, exc)
            return
        self._loop.call_soon_threadsafe(self._settle, opened, None)
        next_cleanup = time.monotonic() + CLEANUP_EVERY
        while True:
            wait = next_cleanup - time.monotonic()
            if self._unwritten:
                wait = min(wait, RETRY_EVERY)
            try:
                batch = self._batches.get(timeout=max(0.0, wait))
            except queue.Empty:
                batch = []
                if time.monotonic() >= next_cleanup:
                    batch = [(self._expire, None)]
                    next_cleanup = time.monotonic() + CLEANUP_EVERY
            if batch is None:
                break
            # Group commit: what the loop handed over while the last commit ran goes into this
            # one (measured: batches of 5 ops, 0.5 ms each, under 64 webhook clients).
            closing = False
            while not closing:
                try:
                    more = self._batches.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                else:
                    batch += more
            self._write(batch)
            if closing:
                break
        if self._unwritten:
            self._write([])
        if self._unwritten:
            _log.error(
                "task journal closed with state changes unwritten",
                path=str(self.path),
                unwritten=len(self._unwritten),
            )
        self._conn.close()

    def _write(self, batch: list[tuple[Op, asyncio.Future[Any] | None]]) -> None:
        """One transaction for the whole batch; on a failure every op in it fails, and the
        state changes among them are kept to be tried again first (their order matters)."""
        assert self._conn is not None and self._loop is not None
        conn = self._conn
        batch = [(op, None) for op in self._unwritten] + batch
        self._unwritten = []
        results: list[Any] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, _ in batch:
                try:
                    results.append(op(conn))
                except sqlite3.IntegrityError as exc:  # this op's own fault (a reused task_id)
                    results.append(JournalUnavailable(f"task journal refused the task: {exc}"))
                except sqlite3.Error:
                    raise  # the file's fault: the whole group fails
                except Exception as exc:  # a bug in one op must not stop the writer
                    results.append(exc)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._failed(exc)
            error = JournalUnavailable(f"task journal cannot be written: {exc}")
            results = [error] * len(batch)
            self._unwritten = [op for op, future in batch if future is None]
            self._changes = {}  # rolled back: what changed is to come again, if at all
        else:
            self.commits += 1
            self._apply_changes()
            if self.last_error is not None:
                _log.info("task journal is writable again", path=str(self.path))
                self.last_error = None
            if self._vacuum_due:
                try:
                    self._vacuum(conn)
                except sqlite3.Error as exc:  # the rows are gone; only the space waits
                    _log.warning("task journal vacuum failed", reason=str(exc))
        in_memory = self.path is None  # then this runs on the loop's own thread
        for (_, future), result in zip(batch, results, strict=True):
            if future is None:
                continue
            if in_memory:
                self._settle(future, result)
            else:
                self._loop.call_soon_threadsafe(self._settle, future, result)

    def _failed(self, exc: sqlite3.Error) -> None:
        if self.last_error is None:  # once per outage, not once per request
            _log.error("task journal cannot be written", path=str(self.path), reason=str(exc))
        self.last_error = str(exc)

    def _count(self, conn: sqlite3.Connection) -> None:
        """Count the tasks by state, once at start; commits then keep the counts."""
        rows = conn.execute(
            "SELECT state, count(*) FROM tasks"
            " WHERE state IN ('queued', 'running', 'done', 'dead') GROUP BY state"
        )
        self._counts = {state: n for state, n in rows}

    def _changed(self, key: str, by: int) -> None:
        """Count `by` more of a state, or of ROWS in memory, once the transaction commits."""
        if by and (key in COUNTED or (key == ROWS and self.path is None)):
            self._changes[key] = self._changes.get(key, 0) + by

    def _apply_changes(self) -> None:
        if self._changes:
            counts = dict(self._counts)
            for state, by in self._changes.items():
                counts[state] = counts.get(state, 0) + by
            self._counts = counts  # whole, so the loop never reads one half changed
            self._changes = {}

    def _expire(self, conn: sqlite3.Connection) -> int:
        """Delete delivered rows past retention and give their pages back to the file system."""
        before = time.time() - self.retention
        removed: int = conn.execute(
            "DELETE FROM tasks WHERE state = 'delivered' AND delivered_at <= ?", (before,)
        ).rowcount
        self._vacuum_due = self._vacuum_due or removed > 0
        self._changed(ROWS, -removed)
        return removed

    def _vacuum(self, conn: sqlite3.Connection) -> None:
        """Free pages go back to the file system (auto_vacuum=INCREMENTAL), and the WAL is
        folded into the file and truncated, so steady load keeps both bounded."""
        self._vacuum_due = False
        conn.execute("PRAGMA incremental_vacuum").fetchall()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _open(self) -> sqlite3.Connection:
        if self.path is None:
            return self._connect()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)  # it holds webhook headers, which may be credentials
        except OSError as exc:
            raise OSError(f"cannot open task journal {self.path}: {exc.strerror}") from None
        try:
            return self._connect()
        except sqlite3.OperationalError:
            raise  # cannot open or lock: not the file's fault, so keep it
        except sqlite3.DatabaseError as exc:
            assert self.path is not None  # a memory database is never corrupt at start
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.rename(f"{aside}{suffix}")
            _log.error(
                "task journal is corrupt; moved aside, starting a fresh one",
                path=str(self.path),
                moved_to=str(aside),
                reason=str(exc),
            )
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        where = ":memory:" if self.path is None else str(self.path)
        conn = sqlite3.connect(where, isolation_level=None)  # transactions are ours
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only before the first table
            conn.execute("PRAGMA journal_mode = WAL").fetchall()
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA journal_size_limit = 4194304")  # a WAL truncated past 4 MiB
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"task journal {self.path} has schema version {version}, newer than this"
                    f" worker's {len(MIGRATIONS)}"
                )
            for number in range(version, len(MIGRATIONS)):
                conn.executescript(
                    f"BEGIN; {MIGRATIONS[number]} PRAGMA user_version = {number + 1}; COMMIT;"
                )
        except BaseException:
            conn.close()
            raise
        return conn
