"""A real `python -m worker` subprocess with a test-owned NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import unused_port

from tests.conftest import AUTH_KEY, LB_KEY, ROOT, TEST_FUNCTIONS


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(path: Path, **sections: dict[str, Any]) -> None:
    tables: dict[str, dict[str, Any]] = {
        "worker": {"functions": ["worker.examples", TEST_FUNCTIONS]},
        "http": {"host": "127.0.0.1", "port": unused_port()},
        "auth": {"auth_key": AUTH_KEY, "lb_auth_key": LB_KEY},
        "logging": {"format": "json"},
        "load_balancer": {"websocket_port": 0},
    }
    for name, table in sections.items():
        tables.setdefault(name, {}).update(table)
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")


class Daemon:
    """One daemon process; `messages` collects every sd_notify datagram it sent."""

    def __init__(self, tmp: Path, **sections: dict[str, Any]) -> None:
        self.tmp = tmp
        self.config_path = tmp / "config.toml"
        write_config(self.config_path, **sections)
        self.port = int(
            next(
                line.split("=")[1]
                for line in self.config_path.read_text().splitlines()
                if line.startswith("port")
            )
        )
        self.notify_path = tmp / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        self.messages: list[tuple[float, str]] = []
        self.process: asyncio.subprocess.Process | None = None
        self.output: list[str] = []
        self._readers: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(
        self,
        env: dict[str, str] | None = None,
        argv_prefix: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
        read_notify: bool = True,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))}
        environ.update({"NOTIFY_SOCKET": str(self.notify_path), "PYTHONPATH": str(ROOT)})
        environ.update(env or {})
        argv = [*(argv_prefix or []), sys.executable, "-m", "worker"]
        argv += ["--config", str(self.config_path)]
        self.process = await asyncio.create_subprocess_exec(
            *argv,
            env=environ,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            pass_fds=pass_fds,
            preexec_fn=preexec_fn,  # e.g. lower an rlimit as a shell's ulimit would
        )
        self._readers = [asyncio.create_task(self._read_output())]
        if read_notify:
            self._readers.append(asyncio.create_task(self._read_notify()))

    async def _read_notify(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.notify, 65536)
            self.messages.append((time.monotonic(), data.decode()))

    async def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            self.output.append(line.decode().rstrip("\n"))

    def fields(self) -> list[str]:
        """Every `KEY=value` the daemon sent, in order."""
        return [field for _, message in self.messages for field in message.split("\n")]

    async def wait_notify(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """Wait for a notify field matching `predicate` (seen before or after the call)."""
        deadline = time.monotonic() + timeout
        while True:
            for field in self.fields():
                if predicate(field):
                    return field
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching notify message; got {self.fields()}")
            if self.process is not None and self.process.returncode is not None:
                raise AssertionError(f"daemon exited: {self.output[-5:]}")
            await asyncio.sleep(0.01)

    async def wait_ready(self) -> None:
        await self.wait_notify(lambda f: f == "READY=1")

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(self._readers[0], 5)
        return code

    async def stop(self) -> None:
        for reader in self._readers:
            reader.cancel()
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.notify.close()

    def log_events(self) -> list[str]:
        return [line for line in self.output if line.startswith("{")]


async def health(session: aiohttp.ClientSession, daemon: Daemon) -> dict[str, Any]:
    async with session.get(f"{daemon.url}/health", headers={"Authorization": AUTH_KEY}) as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def post_task(
    session: aiohttp.ClientSession, daemon: Daemon, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": AUTH_KEY}
    async with session.post(f"{daemon.url}/task", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def poll(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Await `check()` until it returns something truthy, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def start_daemon(
    started: list[Daemon], tmp: Path, env: dict[str, str] | None = None, **sections: dict[str, Any]
) -> Daemon:
    """A daemon started and READY=1, added to `started` (the `daemons` fixture stops them)."""
    daemon = Daemon(tmp, **sections)
    started.append(daemon)
    await daemon.start(env=env)
    await daemon.wait_ready()
    return daemon


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    """The daemon's JSON log events called `name`, in order."""
    found = [json.loads(line) for line in daemon.log_events()]
    return [event for event in found if event["event"] == name]
