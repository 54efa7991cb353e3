"""Talking to systemd (worker/notify.py) over a test-owned notify socket: what each message says,
the STATUS line's pace, the watchdog's conditions, and silence without NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass

import pytest

from worker.notify import STATUS_INTERVAL, Notifier, StatusLine, Watchdog, status_line
from worker.slots import SlotManager, SlotState

SENTINEL = "SENTINEL=test"


@dataclass
class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's, in the abstract namespace."""

    address: str  # as NOTIFY_SOCKET spells it: "@name"
    sock: socket.socket

    async def receive(self, timeout: float = 5.0) -> str:
        async with asyncio.timeout(timeout):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        return data.decode()

    async def until_sentinel(self) -> list[str]:
        """Everything sent before this call: datagrams on one socket keep their order."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
            other.sendto(SENTINEL.encode(), "\0" + self.address[1:])
        messages: list[str] = []
        while (message := await self.receive()) != SENTINEL:
            messages.append(message)
        return messages

    async def nothing_within(self, seconds: float) -> None:
        """A bounded negative wait: no datagram arrives for `seconds`."""
        with pytest.raises(TimeoutError):
            await self.receive(timeout=seconds)


@contextlib.contextmanager
def bound_notify_socket() -> Iterator[NotifySocket]:
    name = f"base-worker-test-{uuid.uuid4()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        yield NotifySocket("@" + name, sock)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    with bound_notify_socket() as bound:
        yield bound


@pytest.fixture
def environ(notify_socket: NotifySocket) -> dict[str, str]:
    """The mapping the Notifier is given (the process environment names no socket)."""
    return {"NOTIFY_SOCKET": notify_socket.address}


MakeNotifier = Callable[[Mapping[str, str]], Notifier]


@pytest.fixture
def notifier_for() -> Iterator[MakeNotifier]:
    """Notifiers for this process; their sockets are closed at the end of the test (the daemon
    keeps its one Notifier for its whole life, so the class has no close of its own)."""
    made: list[Notifier] = []

    def make(environ: Mapping[str, str]) -> Notifier:
        notifier = Notifier(environ, os.getpid())
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close()


def fields(message: str) -> list[str]:
    return message.split("\n")


# --- the Notifier's messages ---------------------------------------------------------------------


async def test_ready_sends_ready_and_the_status_line(
    notify_socket: NotifySocket, environ: dict[str, str], notifier_for: MakeNotifier
) -> None:
    notifier = notifier_for(environ)
    assert notifier.enabled
    notifier.ready(SlotState("ready", 2, 10, 3))
    assert fields(await notify_socket.receive()) == [
        "READY=1",
        "STATUS=ready: 2/10 slots busy, 3 queued",
    ]


async def test_reloading_carries_the_monotonic_clock_in_microseconds(
    notify_socket: NotifySocket, environ: dict[str, str], notifier_for: MakeNotifier
) -> None:
    notifier = notifier_for(environ)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reload, monotonic, status = fields(await notify_socket.receive())
    assert (reload, status) == ("RELOADING=1", "STATUS=reloading configuration")
    name, _, usec = monotonic.partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


async def test_stopping_and_extending_the_stop_timeout(
    notify_socket: NotifySocket, environ: dict[str, str], notifier_for: MakeNotifier
) -> None:
    notifier = notifier_for(environ)
    notifier.stopping("draining: 3 tasks in flight")
    notifier.extend_timeout(7.5)
    notifier.extend_timeout(0.0000015)
    assert await notify_socket.until_sentinel() == [
        "STOPPING=1\nSTATUS=draining: 3 tasks in flight",
        "EXTEND_TIMEOUT_USEC=7500000",
        "EXTEND_TIMEOUT_USEC=1",
    ]


async def test_the_socket_named_in_the_given_mapping_is_the_one_used(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch, notifier_for: MakeNotifier
) -> None:
    with bound_notify_socket() as elsewhere:
        monkeypatch.setenv("NOTIFY_SOCKET", elsewhere.address)
        notifier = notifier_for({"NOTIFY_SOCKET": notify_socket.address})
        notifier.send("READY=1")
        assert await elsewhere.until_sentinel() == []
    assert await notify_socket.until_sentinel() == ["READY=1"]


async def test_silent_without_notify_socket(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch, notifier_for: MakeNotifier
) -> None:
    # Even with a socket in the process environment: the mapping given is what counts here.
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    notifier = notifier_for({"WATCHDOG_USEC": "20000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready(SlotState("ready", 0, 1, 0))
    notifier.reloading()
    notifier.stopping("bye")
    notifier.extend_timeout(5)
    notifier.send("WATCHDOG=1")
    assert await notify_socket.until_sentinel() == []


# --- the watchdog --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "interval"),
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "<own>"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": "<own>"}, None),
        ({}, None),
    ],
    ids=[
        "usec",
        "usec and our pid",
        "usec and another pid",
        "zero",
        "negative",
        "not a number",
        "pid alone",
        "nothing",
    ],
)
def test_the_watchdog_interval_is_half_of_watchdog_usec_when_meant_for_us(
    environ: dict[str, str],
    settings: dict[str, str],
    interval: float | None,
    notifier_for: MakeNotifier,
) -> None:
    pid = os.getpid()
    given = {k: v.replace("<own>", str(pid)) for k, v in settings.items()}
    assert notifier_for({**environ, **given}).watchdog_interval == interval


async def test_the_watchdog_pings_while_started_and_stops_with_its_part(
    notify_socket: NotifySocket, environ: dict[str, str], notifier_for: MakeNotifier
) -> None:
    pid = os.getpid()
    notifier = notifier_for({**environ, "WATCHDOG_USEC": "20000", "WATCHDOG_PID": str(pid)})
    watchdog = Watchdog(notifier)
    await watchdog.start()
    try:
        pings = [await notify_socket.receive() for _ in range(3)]
    finally:
        await watchdog.stop(asyncio.get_running_loop().time())
    assert pings == ["WATCHDOG=1"] * 3
    await notify_socket.until_sentinel()  # whatever was already on its way
    await notify_socket.nothing_within(0.3)  # 30 ping intervals: none after stop


async def test_no_watchdog_pings_for_another_pid(
    notify_socket: NotifySocket, environ: dict[str, str], notifier_for: MakeNotifier
) -> None:
    notifier = notifier_for({**environ, "WATCHDOG_USEC": "20000", "WATCHDOG_PID": "1"})
    watchdog = Watchdog(notifier)
    await watchdog.start()
    try:
        await notify_socket.nothing_within(0.3)  # 30 intervals of the pinging case above
    finally:
        await watchdog.stop(asyncio.get_running_loop().time())


# --- the STATUS line -----------------------------------------------------------------------------


@pytest.fixture
async def slots() -> AsyncIterator[SlotManager]:
    yield SlotManager(limit=4, max_queue=10)


async def test_status_lines_are_coalesced_to_one_a_second_ending_on_the_final_state(
    notify_socket: NotifySocket,
    environ: dict[str, str],
    slots: SlotManager,
    notifier_for: MakeNotifier,
) -> None:
    line = StatusLine(notifier_for(environ), slots)
    await line.start()
    try:
        began = time.monotonic()
        first = slots.admit(1)  # the first change goes out at once
        assert await notify_socket.until_sentinel() == [f"STATUS={status_line(slots.state())}"]
        # A burst within the second: 40 changes, held back and then sent as one line.
        admissions = [slots.admit(1) for _ in range(10)]
        for admission in admissions:
            admission.abandon()
        for _ in range(10):
            slots.admit(2).abandon()
        first.abandon()
        final = f"STATUS={status_line(slots.state())}"
        assert final == "STATUS=ready: 0/4 slots busy, 0 queued"
        assert await notify_socket.receive() == final
        # Not before a second had passed since the first line was sent (sent after `began`).
        assert time.monotonic() - began >= STATUS_INTERVAL * 0.99
        assert await notify_socket.until_sentinel() == []  # and nothing in between or after
    finally:
        await line.stop(asyncio.get_running_loop().time())


async def test_a_status_line_part_that_stopped_sends_nothing_more(
    notify_socket: NotifySocket,
    environ: dict[str, str],
    slots: SlotManager,
    notifier_for: MakeNotifier,
) -> None:
    line = StatusLine(notifier_for(environ), slots)
    await line.start()
    await line.stop(asyncio.get_running_loop().time())
    slots.admit(1)  # before stop, this change would have been sent at once
    slots.hold("maintenance")
    assert await notify_socket.until_sentinel() == []


async def test_without_systemd_the_status_line_does_not_even_listen(
    notify_socket: NotifySocket, slots: SlotManager, notifier_for: MakeNotifier
) -> None:
    changes: list[SlotState] = []
    slots.subscribe(lambda: changes.append(slots.state()))
    line = StatusLine(notifier_for({}), slots)
    await line.start()
    try:
        slots.admit(1)
        assert len(changes) == 1
        assert await notify_socket.until_sentinel() == []
    finally:
        await line.stop(asyncio.get_running_loop().time())
