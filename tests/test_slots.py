from __future__ import annotations

import asyncio

import pytest

from worker.errors import Unavailable
from worker.slots import SlotManager, SlotState


async def test_priority_then_arrival_order_with_one_slot() -> None:
    slots = SlotManager(limit=1, max_queue=10)
    holder = await slots.admit(5).lease()
    order: list[str] = []

    async def queued(label: str, priority: int) -> None:
        lease = await slots.admit(priority).lease()
        order.append(label)
        lease.release()

    waiters = []
    for label, priority in [("p3", 3), ("p1-first", 1), ("p2", 2), ("p1-second", 1)]:
        waiters.append(asyncio.create_task(queued(label, priority)))
        await asyncio.sleep(0)
    assert slots.state().queue == 4
    holder.release()
    await asyncio.gather(*waiters)
    assert order == ["p1-first", "p1-second", "p2", "p3"]
    assert slots.state() == SlotState("ready", 0, 1, 0)


async def test_cancelled_waiter_leaves_queue_without_taking_a_slot() -> None:
    slots = SlotManager(limit=1, max_queue=10)
    holder = await slots.admit(1).lease()
    waiter = asyncio.create_task(slots.admit(1).lease())
    await asyncio.sleep(0)
    assert slots.state().queue == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.state().queue == 0
    holder.release()
    assert slots.state().used == 0


async def test_slot_granted_at_the_moment_of_cancel_is_passed_on() -> None:
    slots = SlotManager(limit=1, max_queue=10)
    holder = await slots.admit(1).lease()
    first = asyncio.create_task(slots.admit(1).lease())
    second = asyncio.create_task(slots.admit(1).lease())
    await asyncio.sleep(0)
    holder.release()  # grants `first`, which is cancelled before it resumes
    first.cancel()
    lease = await second
    assert slots.state().used == 1
    lease.release()
    assert slots.state() == SlotState("ready", 0, 1, 0)


async def test_wait_idle_returns_once_the_last_slot_is_back_and_the_queue_empty() -> None:
    slots = SlotManager(limit=1, max_queue=10)
    await asyncio.wait_for(slots.wait_idle(), 1)  # idle already: at once
    holder = await slots.admit(1).lease()
    queued = asyncio.create_task(slots.admit(1).lease())
    await asyncio.sleep(0)
    drains = [asyncio.create_task(slots.wait_idle()) for _ in range(2)]
    await asyncio.sleep(0)
    drains[0].cancel()  # one drain gives up; the other still waits for the end
    with pytest.raises(asyncio.CancelledError):
        await drains[0]
    holder.release()  # the slot goes straight to the queued task: still not idle
    lease = await queued
    await asyncio.sleep(0)
    assert not drains[1].done()
    lease.release()
    await asyncio.wait_for(drains[1], 1)
    assert slots.state() == SlotState("ready", 0, 1, 0)


async def test_full_queue_and_maintenance_refuse_admission() -> None:
    slots = SlotManager(limit=1, max_queue=1)
    holder = await slots.admit(1).lease()
    queued = slots.admit(1)
    with pytest.raises(Unavailable, match="Queue is full"):
        slots.admit(1)
    slots.hold("maintenance")
    with pytest.raises(Unavailable, match="maintenance"):
        slots.admit(1)
    assert slots.state().available == 0
    holder.release()
    (await queued.lease()).release()  # already-queued work still runs in maintenance
    assert slots.state().used == 0


async def test_resize_grants_waiters_and_shrinking_cancels_nothing() -> None:
    slots = SlotManager(limit=1, max_queue=10)
    leases = [await slots.admit(1).lease()]
    waiting = [asyncio.create_task(slots.admit(1).lease()) for _ in range(2)]
    await asyncio.sleep(0)
    slots.resize(3)
    leases += await asyncio.gather(*waiting)
    assert slots.state().used == 3
    slots.resize(1)
    assert slots.state().used == 3  # nothing cancelled
    late = asyncio.create_task(slots.admit(1).lease())
    await asyncio.sleep(0)
    leases.pop().release()
    leases.pop().release()
    await asyncio.sleep(0)
    assert not late.done()  # still over the new limit of 1
    leases.pop().release()
    (await late).release()
    assert slots.state().used == 0


async def test_subscribers_see_every_change() -> None:
    slots = SlotManager(limit=2, max_queue=10)
    seen: list[SlotState] = []
    unsubscribe = slots.subscribe(lambda: seen.append(slots.state()))
    lease = await slots.admit(1).lease()
    lease.release()
    slots.hold("maintenance")
    unsubscribe()
    slots.hold("maintenance", False)
    assert [(s.used, s.status) for s in seen] == [(1, "ready"), (0, "ready"), (0, "maintenance")]


def test_accepting_follows_the_status_and_the_drain_grace() -> None:
    slots = SlotManager(limit=2, max_queue=10)
    seen = [slots.accepting]
    slots.hold("draining")
    seen.append(slots.accepting)
    slots.set_grace(True)  # draining, yet still taking tasks
    seen.append(slots.accepting)
    slots.admit(1)
    slots.set_grace(False)
    seen.append(slots.accepting)
    with pytest.raises(Unavailable):
        slots.admit(1)
    slots.hold("draining", False)
    slots.hold("maintenance")
    slots.set_grace(True)  # the grace is the drain's only
    seen.append(slots.accepting)
    slots.hold("maintenance", False)
    seen.append(slots.accepting)
    slots.hold("draining")  # the grace given before the drain began holds
    seen.append(slots.accepting)
    assert seen == [True, False, True, False, False, True, True]


def test_subscribers_read_accepting_as_it_is_after_the_change() -> None:
    slots = SlotManager(limit=2, max_queue=10)
    seen: list[tuple[str, bool]] = []
    slots.subscribe(lambda: seen.append((slots.status, slots.accepting)))
    slots.hold("maintenance")
    slots.hold("maintenance", False)
    slots.hold("draining")
    assert seen == [("maintenance", False), ("ready", True), ("draining", False)]


async def test_a_held_slot_is_given_back_once_however_often_it_is_let_go() -> None:
    slots = SlotManager(limit=2, max_queue=10)
    first = slots.admit(1)
    second = slots.admit(1)
    queued = slots.admit(1)
    assert (first.granted, second.granted, queued.granted) == (True, True, False)
    first.release()
    first.release()  # again: nothing more to give back
    first.abandon()  # and its abandon after the release gives back nothing either
    assert queued.granted
    assert slots.state() == SlotState("ready", 2, 2, 0)
    second.release()
    queued.release()
    assert slots.state() == SlotState("ready", 0, 2, 0)
