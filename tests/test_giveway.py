"""Work that gives way: it goes at once on an idle process, waits while arrivals keep the
process busy (for `longest` at most), and goes at the first check that finds no arrival."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from worker.giveway import SCHEDSTAT, GiveWay


def burn(seconds: float) -> None:
    """Use `seconds` of this process's CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


async def test_a_call_goes_at_once_while_the_process_is_idle() -> None:
    give_way = GiveWay(pause=0.02, longest=30.0)
    called: list[int] = []
    give_way.call(lambda: called.append(1))
    assert called == [1]
    # Idle time, not synchronisation: the process uses no CPU while it sleeps.
    await asyncio.sleep(0.1)
    give_way.arrived()
    give_way.call(lambda: called.append(2))
    assert called == [1, 2]


@contextlib.asynccontextmanager
async def arriving(give_way: GiveWay, burning: float, idle: float) -> AsyncIterator[None]:
    """Arrivals in the background while the block runs: each after `burning` seconds of CPU
    and `idle` seconds asleep."""
    stop = asyncio.Event()

    async def arrivals() -> None:
        while not stop.is_set():
            give_way.arrived()
            burn(burning)
            await asyncio.sleep(idle)  # idle time, not synchronisation

    task = asyncio.ensure_future(arrivals())
    try:
        yield
    finally:
        stop.set()
        await task


async def held_for(give_way: GiveWay) -> float:
    """Call now with a callback that must wait; the seconds until it is called."""
    loop = asyncio.get_running_loop()
    released: asyncio.Future[float] = loop.create_future()
    asked = loop.time()
    give_way.call(lambda: released.set_result(loop.time()))
    assert give_way.waiting == 1
    async with asyncio.timeout(10):
        went = await released
    return went - asked


async def test_while_arrivals_keep_the_process_busy_a_call_waits_for_longest() -> None:
    give_way = GiveWay(pause=0.05, longest=0.5, busy=0.05)
    async with arriving(give_way, burning=0.005, idle=0):
        give_way.call(lambda: None)  # the first look finds nothing to compare with
        await asyncio.sleep(0.06)  # arrivals and CPU since that look
        assert await held_for(give_way) >= 0.5


async def test_a_waiting_group_goes_at_the_first_check_with_no_arrival() -> None:
    loop = asyncio.get_running_loop()
    give_way = GiveWay(pause=0.5, longest=30.0)
    give_way.call(lambda: None)
    released = loop.create_future()
    asked = loop.time()
    give_way.call(lambda: released.set_result(loop.time()))  # within `pause`: it waits
    assert give_way.waiting == 1 and not released.done()
    async with asyncio.timeout(10):
        went = await released
    assert 0.5 <= went - asked < 30.0
    assert give_way.waiting == 0


async def test_release_calls_what_waits_now_and_a_later_call_waits_in_a_new_group() -> None:
    give_way = GiveWay(pause=0.2, longest=0.2, busy=0.0)
    called: list[str] = []
    give_way.call(lambda: called.append("first"))
    give_way.call(lambda: called.append("held"))
    give_way.release()
    assert called == ["first", "held"] and give_way.waiting == 0
    went = asyncio.Event()
    give_way.call(went.set)  # a new group, with its own check
    assert give_way.waiting == 1
    async with asyncio.timeout(10):
        await went.wait()
    assert give_way.waiting == 0


async def test_a_callback_that_raises_does_not_keep_the_others_waiting() -> None:
    give_way = GiveWay(pause=60.0, longest=60.0)
    called: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in one")

    give_way.call(lambda: called.append("first"))
    give_way.call(broken)
    give_way.call(lambda: called.append("after"))
    with pytest.raises(RuntimeError, match="a bug in one"):
        give_way.release()
    assert called == ["first", "after"] and give_way.waiting == 0


async def test_a_waiting_group_keeps_waiting_while_arrivals_keep_the_thread_a_little_busy() -> None:
    # Busy about half the time below: under `busy`, which starts a wait, over `keep`, which
    # keeps one going.
    give_way = GiveWay(pause=0.05, longest=0.5, busy=0.95, keep=0.1)
    give_way.call(lambda: None)  # the first look: at once
    async with arriving(give_way, burning=0.004, idle=0.004):
        assert await held_for(give_way) >= 0.5  # called within `pause`: it waits


SHARED_CPU_PROBE = """
import asyncio, os, sys, time
from worker.giveway import GiveWay

os.sched_setaffinity(0, {int(sys.argv[1])})


async def main() -> None:
    give_way = GiveWay(pause=0.3, longest=60.0, busy=0.8)
    called = []
    give_way.call(lambda: None)  # the first look
    began, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - began < 0.4:  # wanting the CPU all along, arrivals all along
        give_way.arrived()
    share = (time.process_time() - cpu) / (time.monotonic() - began)
    give_way.call(lambda: called.append(1))
    print(f"{share:.3f}", "went" if called else "held")


asyncio.run(main())
"""


@pytest.mark.skipif(not os.path.exists(SCHEDSTAT), reason="the kernel keeps no schedstat")
def test_a_thread_that_waits_for_a_shared_cpu_counts_as_busy() -> None:
    """Beside a process spinning on the same CPU, the loop gets about half of it: its CPU time
    alone would read not busy; the time it waited to run counts too."""
    cpu = min(os.sched_getaffinity(0))
    spinner = subprocess.Popen(
        [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    try:
        deadline = time.monotonic() + 10
        stat = Path(f"/proc/{spinner.pid}/schedstat")
        while int(stat.read_text().split()[0]) < 50_000_000:  # it spins: 50 ms on a CPU
            assert time.monotonic() < deadline, "the spinning process never ran"
            time.sleep(0.01)
        probe = subprocess.run(
            [sys.executable, "-c", SHARED_CPU_PROBE, str(cpu)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        spinner.kill()
        spinner.wait()
    assert probe.returncode == 0, probe.stderr
    share, verdict = probe.stdout.split()
    assert float(share) < 0.8  # the CPU was shared: CPU time alone reads not busy
    assert verdict == "held"
