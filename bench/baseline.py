"""The ceiling: a bare aiohttp server answering the bench requests with the same JSON.

No validation, no queue, no task per request, no log line: what aiohttp itself costs for the
same request on the same event loop. `python bench/baseline.py --port P --loop uvloop`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import ClientSession, web

try:  # parse as the worker does (worker/jsoncodec.py); answer with the same text it sends
    import orjson

    loads: Callable[[bytes], Any] = orjson.loads
    dumps: Callable[[Any], bytes] = orjson.dumps
except ImportError:
    loads = json.loads

    def dumps(body: Any) -> bytes:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


CHUNK = b"x" * 65536
_started = itertools.count()


def answer(body: Any, status: int = 200) -> web.Response:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    return web.Response(body=dumps(body), status=status, headers=headers)


class Baseline:
    def __init__(self, auth_key: str, slots: int) -> None:
        self.auth_key = auth_key
        self.slots = asyncio.Semaphore(slots)
        self.client: ClientSession | None = None
        self.deliveries: set[asyncio.Task[None]] = set()

    async def task(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != self.auth_key:
            return answer({"success": False, "error": "Unauthorized"}, 401)
        body = loads(await request.read())
        function, params = body["function"], body.get("input", {})
        mode = body.get("mode", "sync")
        if mode == "stream":
            return await self.stream(request, int(params.get("count", 64)))
        if mode == "webhook":
            task_id = str(uuid.uuid4())
            delivery = asyncio.create_task(self.deliver(body["webhook"]["url"], task_id, function))
            self.deliveries.add(delivery)
            delivery.add_done_callback(self.deliveries.discard)
            return answer({"success": True, "task_id": task_id, "message": "accepted"}, 202)
        return answer({"success": True, "result": await self.call(function, params)})

    async def call(self, function: str, params: dict[str, Any]) -> Any:
        if function == "hello":
            return {"message": f"Hello {params.get('name', 'World')}!"}
        if function == "sleeper":
            async with self.slots:
                started = next(_started)
                await asyncio.sleep(params.get("seconds", 0.01))
                return {"started": started}
        return None

    async def stream(self, request: web.Request, count: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(count):
            await response.write(CHUNK)
        await response.write_eof()
        return response

    async def deliver(self, url: str, task_id: str, function: str) -> None:
        if self.client is None:
            self.client = ClientSession()
        body = {"task_id": task_id, "function": function, "success": True, "result": None}
        async with self.client.post(url, json=body) as response:
            await response.read()

    async def health(self, request: web.Request) -> web.Response:
        return answer({"status": "ready"})


async def serve(host: str, port: int, auth_key: str, slots: int) -> None:
    baseline = Baseline(auth_key, slots)
    app = web.Application()
    app.router.add_post("/task", baseline.task)
    app.router.add_get("/health", baseline.health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True, backlog=1024).start()  # as the worker
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", notify)
    try:
        await asyncio.Event().wait()
    finally:
        if baseline.client is not None:
            await baseline.client.close()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--auth-key", default="bench-key")
    parser.add_argument("--slots", type=int, default=100)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.host, args.port, args.auth_key, args.slots))


if __name__ == "__main__":
    main()
