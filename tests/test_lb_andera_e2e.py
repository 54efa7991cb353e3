"""A real `python -m worker`, discovered and used the way the Andera load balancer does it, and
registered with a fake self-registration balancer at the same time; then SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType
from aiohttp.test_utils import unused_port

from tests.conftest import AUTH_KEY, LB_KEY, wait_for
from tests.daemon import Daemon
from tests.lb_fakes import FakeBalancer


async def test_andera_discovery_ping_task_and_drain(tmp_path: Path) -> None:
    ws_port = unused_port()
    outbound = FakeBalancer(LB_KEY)
    await outbound.start()
    daemon = Daemon(
        tmp_path,
        worker={"functions": ["worker.examples"], "group": "default", "slots": 4},
        load_balancer={"websocket_port": ws_port, "url": outbound.url},
    )
    await daemon.start()
    try:
        await daemon.wait_ready()
        async with aiohttp.ClientSession() as session:
            # Discovery: GET /health with x-lb-auth, and the fields (and types) it reads.
            async with session.get(f"{daemon.url}/health", headers={"x-lb-auth": LB_KEY}) as r:
                assert r.status == 200
                found = await r.json()
            assert found["status"] == "ready"
            assert found["group"] == "default"
            assert found["contract"] == 1 and type(found["contract"]) is int
            assert found["websocketPort"] == ws_port
            assert found["services"] == []
            assert found["functions"] == [
                {
                    "name": "hello",
                    "params": {"name": {"type": "string", "required": False, "default": "World"}},
                }
            ]
            assert found["slots"] == {"used": 0, "available": 4, "limit": 4, "queue": 0}
            assert set(found["system"]) == {"uptime", "cpuLoad", "usedMemoryPercent"}
            assert all(isinstance(v, int | float) for v in found["system"].values())

            # The websocket with the key as subprotocol; `ping` answered within 3 s.
            ws = await session.ws_connect(
                f"ws://127.0.0.1:{found['websocketPort']}/", protocols=(LB_KEY,)
            )
            assert ws.protocol == LB_KEY
            await ws.send_str("ping")
            async with asyncio.timeout(3):
                while True:
                    reply = await ws.receive_json()
                    if "system" not in reply:
                        break
            assert reply == {
                "status": "ready",
                "slots": {"used": 0, "available": 4, "limit": 4, "queue": 0},
            }

            # A routed task: both keys, the client's body plus the balancer's _taskId.
            headers = {"Authorization": AUTH_KEY, "x-lb-auth": LB_KEY}
            body = {
                "function": "hello",
                "input": {"name": "Andera"},
                "contract": 1,
                "_taskId": "andera-job-42",
            }
            async with session.post(f"{daemon.url}/task", json=body, headers=headers) as r:
                assert r.status == 200
                assert r.headers["X-Task-Id"] == "andera-job-42"
                assert await r.json() == {"success": True, "result": {"message": "Hello Andera!"}}

            # Self-registration happened alongside.
            await wait_for(lambda: bool(outbound.of_type("register")))
            registered = outbound.of_type("register")[0]["worker"]
            assert registered["url"] == daemon.url
            assert registered["functions"] == found["functions"]

            # SIGTERM: both links hear `draining` before the worker goes away with 1001.
            daemon.signal(signal.SIGTERM)
            seen: list[str] = []
            async with asyncio.timeout(10):
                async for message in ws:
                    if message.type == WSMsgType.TEXT:
                        seen.append(json.loads(message.data)["status"])
            assert "draining" in seen
            assert ws.close_code == 1001
            assert await daemon.wait_exit() == 0
            await wait_for(lambda: outbound.close_codes == [1001])
            assert outbound.of_type("status")[-1]["status"] == "draining"
    finally:
        await daemon.stop()
        await outbound.stop()
