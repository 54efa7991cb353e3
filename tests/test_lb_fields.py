"""Every field the Andera balancer and its dashboard read, in the type and unit the Andera worker
sends, checked on a real daemon's /health and websocket messages; and the balancer's scoring rule
applied to them next to an Andera-shaped worker. The table is in docs/load-balancer-protocol.md."""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import unused_port

from tests.conftest import LB_KEY, ROOT, wait_for
from tests.daemon import Daemon
from tests.lb_fakes import FakeBalancer
from worker import __version__

GROUP = "fields"
CONTRACT = 3
SLOTS = 4
# The daemon's 1-minute load is pinned to this many times its CPU count, so that a fraction and a
# percentage cannot coincide (on an idle host both would be about 0).
PINNED_LOAD = 0.123456
SHIM = f"""\
import os

_load = {PINNED_LOAD!r} * (os.cpu_count() or 1)
os.getloadavg = lambda: (_load, _load, _load)
"""
# The TS base worker's `hello` (andera-top/base-worker src/functions/hello.ts) as the balancer
# compares it: JSON text, key order included.
ANDERA_HELLO = (
    '[{"name":"hello","params":{"name":{"type":"string","required":false,"default":"World"}}}]'
)
MESSAGES = ("health", "ping", "status", "register", "outbound status")
DOCS = ROOT / "docs" / "load-balancer-protocol.md"


def andera_memory_percent() -> float:
    """usedMemoryPercent the TS worker way: (1 - available / total), in percent, one decimal."""
    fields: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return round((1 - fields["MemAvailable"] / fields["MemTotal"]) * 1000) / 10


@dataclass(frozen=True)
class Seen:
    """One message, when it arrived, and the host's memory (the Andera way) at that moment."""

    message: dict[str, Any]
    at: float
    memory_percent: float


@dataclass(frozen=True)
class Observed:
    seen: dict[str, Seen]
    spawned: float
    websocket_port: int
    url: str


async def next_message(
    ws: aiohttp.ClientWebSocketResponse, wanted: Callable[[dict[str, Any]], bool]
) -> Seen:
    deadline = time.monotonic() + 5
    while True:
        message = await ws.receive(timeout=max(0.0, deadline - time.monotonic()))
        assert message.type == WSMsgType.TEXT, message
        data = json.loads(message.data)
        if wanted(data):
            return Seen(data, time.monotonic(), andera_memory_percent())


async def observe(tmp: Path) -> Observed:
    shim = tmp / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    ws_port = unused_port()
    outbound = FakeBalancer(LB_KEY)
    await outbound.start()
    daemon = Daemon(
        tmp,
        worker={
            "functions": ["worker.examples"],
            "group": GROUP,
            "contract": CONTRACT,
            "slots": SLOTS,
        },
        load_balancer={"websocket_port": ws_port, "url": outbound.url},
    )
    seen: dict[str, Seen] = {}
    spawned = time.monotonic()
    try:
        await daemon.start(env={"PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"})
        await daemon.wait_ready()
        await wait_for(lambda: bool(outbound.of_type("status")), timeout=10)
        memory_percent = andera_memory_percent()
        for kind, name in (("register", "register"), ("status", "outbound status")):
            at, message = next((at, m) for at, m in outbound.received if m.get("type") == kind)
            seen[name] = Seen(message, at, memory_percent)
        async with aiohttp.ClientSession() as session:
            headers = {"x-lb-auth": LB_KEY}
            async with session.get(f"{daemon.url}/health", headers=headers) as response:
                assert response.status == 200
                body = await response.json()
                seen["health"] = Seen(body, time.monotonic(), andera_memory_percent())
            ws_url = f"ws://127.0.0.1:{ws_port}/"
            async with session.ws_connect(ws_url, protocols=(LB_KEY,)) as ws:
                seen["status"] = await next_message(ws, lambda m: "system" in m)
                await ws.send_str("ping")
                seen["ping"] = await next_message(ws, lambda m: "system" not in m)
    finally:
        await daemon.stop()
        await outbound.stop()
    return Observed(seen, spawned, ws_port, daemon.url)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Observed:
    """One daemon, observed once: every test below reads what it sent."""
    return asyncio.run(observe(tmp_path_factory.mktemp("fields")))


def value_at(observed: Observed, message: str, path: str) -> Any:
    root = observed.seen[message].message
    if message == "register" and path != "type":
        root = root["worker"]
    for part in path.split("."):
        root = root[part]
    return root


# What the JSON types of the docs table mean in Python, after json.loads.
KINDS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: type(v) is str,
    "integer": lambda v: type(v) is int,
    "number": lambda v: type(v) in (int, float),
    "array": lambda v: type(v) is list,
    "object": lambda v: type(v) is dict,
}

Check = Callable[[Any, Observed, str], None]


def equals(expected: Callable[[Observed, str], Any]) -> Check:
    def check(value: Any, observed: Observed, message: str) -> None:
        assert value == expected(observed, message)

    return check


def check_cpu_load(value: Any, observed: Observed, message: str) -> None:
    # Unrounded, like the TS worker: a rounded or percentage value misses this.
    assert math.isclose(value, PINNED_LOAD, rel_tol=1e-9), value


def check_memory(value: Any, observed: Observed, message: str) -> None:
    assert 0 < value <= 100
    assert round(value, 1) == value  # one decimal, like the TS worker
    assert abs(value - observed.seen[message].memory_percent) < 0.5


def check_uptime(value: Any, observed: Observed, message: str) -> None:
    # Seconds: the process cannot have been up longer than since the test spawned it.
    assert 0 <= value <= observed.seen[message].at - observed.spawned + 0.1


def check_functions(value: Any, observed: Observed, message: str) -> None:
    assert json.dumps(value, separators=(",", ":")) == ANDERA_HELLO


def check_services(value: Any, observed: Observed, message: str) -> None:
    assert value == []  # the daemon under test declares no @service


def check_status(value: Any, observed: Observed, message: str) -> None:
    assert value == "ready"


def check_tags(value: Any, observed: Observed, message: str) -> None:
    assert value == {"python": platform.python_version()}  # worker.examples' tag


IDLE_SLOTS = {"used": 0, "available": SLOTS, "limit": SLOTS, "queue": 0}  # no task was sent


def slot(name: str) -> Check:
    return equals(lambda observed, message: IDLE_SLOTS[name])


@dataclass(frozen=True)
class Field:
    path: str
    kind: str
    carried_in: tuple[str, ...]
    check: Check


EVERYWHERE = MESSAGES
OUTBOUND_TYPES = {"register": "register", "outbound status": "status"}
SYSTEM = ("health", "status", "outbound status")
FIELDS = [
    Field("status", "string", EVERYWHERE, check_status),
    Field("group", "string", ("health", "register"), equals(lambda o, m: GROUP)),
    Field("contract", "integer", ("health", "register"), equals(lambda o, m: CONTRACT)),
    Field("websocketPort", "integer", ("health",), equals(lambda o, m: o.websocket_port)),
    Field("functions", "array", ("health", "register"), check_functions),
    Field("services", "array", ("health", "status", "outbound status"), check_services),
    Field("tags", "object", ("health",), check_tags),
    Field("slots.used", "integer", EVERYWHERE, slot("used")),
    Field("slots.available", "integer", EVERYWHERE, slot("available")),
    Field("slots.limit", "integer", EVERYWHERE, slot("limit")),
    Field("slots.queue", "integer", EVERYWHERE, slot("queue")),
    Field("system.cpuLoad", "number", SYSTEM, check_cpu_load),
    Field("system.usedMemoryPercent", "number", SYSTEM, check_memory),
    Field("system.uptime", "number", SYSTEM, check_uptime),
    Field("version", "string", ("health", "register"), equals(lambda o, m: __version__)),
    Field(
        "type", "string", ("register", "outbound status"), equals(lambda o, m: OUTBOUND_TYPES[m])
    ),
    Field("url", "string", ("register",), equals(lambda o, m: o.url)),
]


@pytest.mark.parametrize(
    ("field", "message"),
    [(f, m) for f in FIELDS for m in f.carried_in],
    ids=[f"{m}:{f.path}" for f in FIELDS for m in f.carried_in],
)
def test_field_has_the_andera_type_and_unit(field: Field, message: str, observed: Observed) -> None:
    value = value_at(observed, message, field.path)
    assert KINDS[field.kind](value), f"{field.path} is {type(value).__name__}, not {field.kind}"
    field.check(value, observed, message)


def andera_score(message: dict[str, Any]) -> float:
    """The score the Andera balancer ranks candidates by (selectBestWorker: highest wins)."""
    system = message.get("system", {})
    cpu_load = system.get("cpuLoad", 0)
    memory = system.get("usedMemoryPercent", 0)
    return float(message["slots"]["available"] * 10 - cpu_load * 5 - memory * 5)


def andera_worker(available: int, memory_percent: float) -> dict[str, Any]:
    """A status message as the TS worker would send it from the same host at the same moment."""
    return {
        "status": "ready",
        "slots": {"used": SLOTS - available, "available": available, "limit": SLOTS, "queue": 0},
        "system": {"uptime": 1.0, "cpuLoad": PINNED_LOAD, "usedMemoryPercent": memory_percent},
        "services": [],
    }


@pytest.mark.parametrize("message", SYSTEM)
def test_scores_within_a_point_of_an_andera_worker_with_equal_free_slots(
    message: str, observed: Observed
) -> None:
    seen = observed.seen[message]
    ours = seen.message
    reference = andera_worker(ours["slots"]["available"], seen.memory_percent)
    assert abs(andera_score(ours) - andera_score(reference)) < 1


def test_one_free_slot_more_than_an_andera_worker_wins_the_task(observed: Observed) -> None:
    seen = observed.seen["status"]
    ours = seen.message
    theirs = andera_worker(ours["slots"]["available"] - 1, seen.memory_percent)
    fleet = sorted([("andera", theirs), ("base-worker", ours)], key=lambda w: -andera_score(w[1]))
    assert fleet[0][0] == "base-worker"


def documented_fields() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The docs table: field -> (type, carried in)."""
    text = DOCS.read_text()
    section = text.split("## Fields the Andera balancer reads", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        carried_in = tuple(part.strip() for part in cells[3].split(","))
        rows[cells[0].strip("`")] = (cells[1], carried_in)
    return rows


def test_the_docs_table_lists_every_checked_field_with_its_type() -> None:
    tested = {f.path: (f.kind, f.carried_in) for f in FIELDS}
    assert documented_fields() == tested
