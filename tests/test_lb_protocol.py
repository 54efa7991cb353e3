"""What both load balancer links say and when (worker/lb_protocol.py): the messages, the
advertised URL, credentials kept out of logs, send/close, and the StatusFeed's pace."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import make_config, wait_for
from worker import __version__, functions, lb_protocol
from worker.lb_protocol import (
    MIN_GAP,
    StatusFeed,
    advertise_url,
    close,
    inbound_status,
    outbound_status,
    ping_reply,
    register,
    send,
    without_credentials,
)
from worker.slots import SlotManager, SlotState

BUSY = SlotState("ready", 3, 4, 2)
SYSTEM_KEYS = {"uptime", "cpuLoad", "usedMemoryPercent"}


# --- messages ------------------------------------------------------------------------------------


def test_ping_reply_is_status_and_slots() -> None:
    assert ping_reply(BUSY) == {
        "status": "ready",
        "slots": {"used": 3, "available": 1, "limit": 4, "queue": 2},
    }
    maintenance = ping_reply(SlotState("maintenance", 1, 4, 0))
    assert maintenance["status"] == "maintenance"
    assert maintenance["slots"]["available"] == 0  # nothing on offer outside "ready"


SERVICES = [{"name": "browser", "state": "down", "status": "RuntimeError: no licence"}]


def test_inbound_status_has_the_andera_workers_shape() -> None:
    message = inbound_status(BUSY, list)
    assert set(message) == {"status", "slots", "system", "services"}
    assert (message["status"], message["slots"]) == ("ready", BUSY.as_dict())
    assert set(message["system"]) == SYSTEM_KEYS
    assert message["services"] == []
    assert inbound_status(BUSY, lambda: SERVICES)["services"] == SERVICES


def test_outbound_status_is_typed_and_carries_the_services() -> None:
    message = outbound_status(SlotState("draining", 0, 4, 0), lambda: SERVICES)
    assert set(message) == {"type", "status", "slots", "system", "services"}
    assert (message["type"], message["status"]) == ("status", "draining")
    assert message["slots"] == {"used": 0, "available": 0, "limit": 4, "queue": 0}
    assert set(message["system"]) == SYSTEM_KEYS
    assert message["services"] == SERVICES


def test_register_says_who_the_worker_is_and_where_to_reach_it() -> None:
    cfg = make_config(
        worker={"group": "gpu", "contract": 4, "functions": ["worker.examples"]},
        load_balancer={"advertise_url": "https://worker-7.internal:8443/"},
    )
    registry = functions.load(cfg.worker.functions)
    message = register(cfg, registry, BUSY)
    assert message == {
        "type": "register",
        "worker": {
            "url": "https://worker-7.internal:8443",
            "group": "gpu",
            "contract": 4,
            "functions": registry.describe(),
            "slots": BUSY.as_dict(),
            "status": "ready",
            "version": __version__,
        },
    }
    assert [f["name"] for f in message["worker"]["functions"]] == ["hello"]
    json.dumps(message)  # it goes over the wire as it is


# --- the advertised URL --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "advertised"),
    [
        ("https://w.example/base/", "https://w.example/base"),
        ("http://10.0.0.5:3000", "http://10.0.0.5:3000"),
        ("http://w.example//", "http://w.example"),
    ],
)
def test_an_advertise_url_is_used_as_given_without_trailing_slashes(
    given: str, advertised: str
) -> None:
    cfg = make_config(http={"host": "0.0.0.0"}, load_balancer={"advertise_url": given})
    assert advertise_url(cfg) == advertised


@pytest.mark.parametrize(
    ("host", "advertised"),
    [
        ("127.0.0.1", "http://127.0.0.1:3005"),
        ("worker.example", "http://worker.example:3005"),
        ("::1", "http://[::1]:3005"),
        ("2001:db8::7", "http://[2001:db8::7]:3005"),
    ],
)
def test_without_advertise_url_the_listen_address_is_advertised(host: str, advertised: str) -> None:
    assert advertise_url(make_config(http={"host": host, "port": 3005})) == advertised


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", ""])
def test_a_wildcard_host_is_advertised_by_the_machines_name(wildcard: str) -> None:
    cfg = make_config(http={"host": wildcard, "port": 3005})
    assert advertise_url(cfg) == f"http://{socket.gethostname()}:3005"


# --- credentials out of logs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ws://lb.internal:8080/workers", "ws://lb.internal:8080/workers"),
        ("wss://user:s3cret@lb.example/workers", "wss://***@lb.example/workers"),
        ("wss://token@lb.example:443/w", "wss://***@lb.example:443/w"),
        ("ws://lb.example/workers?key=s3cret&x=1", "ws://lb.example/workers?***"),
        ("wss://u:p@lb.example/w?key=s3cret", "wss://***@lb.example/w?***"),
        ("ws://lb.example/a@b", "ws://lb.example/a@b"),  # an @ in the path is no userinfo
        ("ws://lb.example?x=a@b", "ws://lb.example?***"),
    ],
)
def test_without_credentials_masks_userinfo_and_query(url: str, shown: str) -> None:
    assert without_credentials(url) == shown


def test_without_credentials_masks_a_password_containing_an_at_sign() -> None:
    # yarl reads this as user "user", password "p@ss", host "lb.example".
    assert without_credentials("wss://user:p@ss@lb.example/w") == "wss://***@lb.example/w"


# --- send and close ------------------------------------------------------------------------------


class FakeSocket:
    """Either end of a link, as far as send and close use it."""

    def __init__(self, fail_close: BaseException | None = None) -> None:
        self.sent: list[str] = []
        self.closed: list[tuple[int, bytes]] = []
        self.fail_close = fail_close

    async def send_str(self, data: str, compress: int | None = None) -> None:
        self.sent.append(data)

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        self.closed.append((code, message))
        if self.fail_close is not None:
            raise self.fail_close
        return True


async def test_send_writes_one_json_text_message() -> None:
    ws = FakeSocket()
    await send(ws, {"type": "status", "slots": {"used": 1}})
    assert [json.loads(text) for text in ws.sent] == [{"type": "status", "slots": {"used": 1}}]


@pytest.mark.parametrize(
    "failure", [None, ConnectionResetError("gone"), TimeoutError()], ids=["ok", "reset", "timeout"]
)
async def test_close_sends_its_code_and_never_raises_for_a_gone_peer(
    failure: BaseException | None,
) -> None:
    ws = FakeSocket(fail_close=failure)
    await close(ws, 1001, b"shutting down")
    assert ws.closed == [(1001, b"shutting down")]


async def test_close_lets_a_programming_error_through() -> None:
    with pytest.raises(ValueError):
        await close(FakeSocket(fail_close=ValueError("bug")), 1000)


# --- the status feed -----------------------------------------------------------------------------


@pytest.fixture
async def slots() -> AsyncIterator[SlotManager]:
    yield SlotManager(limit=4, max_queue=100)


def burst(slots: SlotManager, changes: int) -> None:
    """`changes` slot changes in one go, ending where they started (one slot taken)."""
    for _ in range(changes // 2):
        slots.admit(1).abandon()


def suspended(task: asyncio.Task[Any]) -> bool:
    """True once `task` has run up to an await (so it is really waiting, not unstarted)."""
    return inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_SUSPENDED


async def not_due_within(feed: StatusFeed, seconds: float) -> None:
    """A bounded negative wait: no message falls due for `seconds`."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(seconds):
            await feed.next()


async def test_the_first_message_with_a_period_is_due_at_once(slots: SlotManager) -> None:
    feed = StatusFeed(slots, period=30.0)
    try:
        async with asyncio.timeout(5):  # far below the period: it did not wait for it
            assert await feed.next() == slots.state()
    finally:
        feed.close()


async def test_a_burst_of_changes_is_one_message_with_the_state_as_it_is_then(
    slots: SlotManager,
) -> None:
    feed = StatusFeed(slots, period=None)
    sent: list[SlotState] = []

    async def sender() -> None:
        while True:
            sent.append(await feed.next())

    sending = asyncio.create_task(sender())
    try:
        held = slots.admit(1)
        burst(slots, 2000)
        await wait_for(lambda: len(sent) == 1)
        assert sent == [SlotState("ready", 1, 4, 0)]
        held.abandon()
        burst(slots, 2000)
        await wait_for(lambda: len(sent) == 2)
        assert sent[-1] == slots.state() == SlotState("ready", 0, 4, 0)
        await not_due_within(feed, 0.3)  # nothing changed since: nothing more is due
        assert len(sent) == 2  # 4002 changes, two messages
    finally:
        sending.cancel()
        feed.close()


async def test_slot_changes_wait_min_gap_after_the_previous_message(slots: SlotManager) -> None:
    feed = StatusFeed(slots, period=None)
    loop = asyncio.get_running_loop()
    try:
        slots.admit(1)
        before = loop.time()  # the first message is sent at or after this
        await feed.next()
        slots.admit(1)
        await asyncio.wait_for(feed.next(), 5)
        # A lower bound, which slowness cannot break (the loop may wake a timer a clock
        # resolution early, hence the microsecond).
        assert loop.time() - before >= MIN_GAP - 1e-6
    finally:
        feed.close()


async def test_a_status_change_skips_the_gap(
    slots: SlotManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A gap longer than the waits below turns "skips the gap" into plain ordering: a message
    # that waited for the gap could not arrive within them.
    monkeypatch.setattr(lb_protocol, "MIN_GAP", 30.0)
    feed = StatusFeed(slots, period=None)
    try:
        held = [slots.admit(1) for _ in range(3)]
        await feed.next()
        slots.hold("maintenance")
        async with asyncio.timeout(5):
            assert (await feed.next()).status == "maintenance"
        # A slot change alone waits for the gap, until a status change makes it due at once.
        held.pop().abandon()
        await not_due_within(feed, 0.3)
        waiting = asyncio.create_task(feed.next())
        await wait_for(lambda: suspended(waiting))
        slots.hold("draining")
        async with asyncio.timeout(5):
            state = await waiting
        assert (state.status, state.used) == ("draining", 2)
    finally:
        feed.close()


async def test_poke_makes_a_message_due_at_once(
    slots: SlotManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lb_protocol, "MIN_GAP", 30.0)
    feed = StatusFeed(slots, period=None)
    try:
        slots.admit(1)
        await feed.next()
        await not_due_within(feed, 0.3)  # nothing changed
        feed.poke()
        async with asyncio.timeout(5):
            assert await feed.next() == slots.state()
    finally:
        feed.close()


async def test_with_a_period_a_message_is_due_that_long_after_the_previous_one(
    slots: SlotManager,
) -> None:
    feed = StatusFeed(slots, period=0.3)
    loop = asyncio.get_running_loop()
    try:
        before = loop.time()
        await feed.next()  # the first, at once
        async with asyncio.timeout(5):
            assert await feed.next() == slots.state()  # nothing changed: the period's message
        assert loop.time() - before >= 0.3 - 1e-6
    finally:
        feed.close()


async def test_without_a_period_nothing_is_due_until_something_changes(
    slots: SlotManager,
) -> None:
    feed = StatusFeed(slots, period=None)
    try:
        await not_due_within(feed, 0.3)
        slots.admit(1)
        async with asyncio.timeout(5):
            assert (await feed.next()).used == 1
    finally:
        feed.close()


async def test_a_closed_feed_no_longer_follows_the_slots(slots: SlotManager) -> None:
    feed = StatusFeed(slots, period=None)
    feed.close()
    feed.close()  # twice is fine
    slots.admit(1)
    slots.hold("maintenance")
    await not_due_within(feed, 0.3)
