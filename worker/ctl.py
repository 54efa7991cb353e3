"""`base-worker ctl`: the operator's client of a running worker's HTTP API.

A thin client: it finds the address and the key in the daemon's own config (or takes `--url` and
$BASE_WORKER_KEY), asks, prints for people (aligned, coloured on a terminal) or JSON for scripts,
and tells scripts with its exit code what happened. It never prints the key. The command line
itself is declared in `worker.cli`, which imports this module only when `ctl` is asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from yarl import URL

from worker.config import Config
from worker.errors import ConfigError

# Exit codes (the contract's): scripts branch on them.
OK, ERROR, USAGE, NOT_READY, UNREACHABLE = 0, 1, 2, 3, 4
INTERRUPTED = 130  # Ctrl-C during a one-shot command, as shells report it

KEY_VARIABLE = "BASE_WORKER_KEY"
# A daemon listening on every address is reached on the loopback of the same family.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0
RECONNECT_FIRST = 0.2  # seconds before the first reconnection of `logs -f`, doubled up to...
RECONNECT_MAX = 5.0
FOLLOW_BACKLOG = 10  # lines `logs -f` shows before following, like `tail -f`
ALL_LINES = 999_999_999  # the largest `lines=N` the daemon takes


class CtlError(Exception):
    """A failure to report in one line on stderr, with the exit code that says what it was."""

    def __init__(self, message: str, code: int = ERROR, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status  # the HTTP status, when the worker (or a proxy) refused


class Unreachable(CtlError):
    """Nothing answered at the worker's address (refused, timed out, cut off)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, UNREACHABLE)


@dataclass(frozen=True)
class Target:
    """Where the worker is and the operator key it takes; `source` says where they came from."""

    url: URL
    key: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return str(self.url.with_user(None))


def target_from_config(cfg: Config, path: Path | None) -> Target:
    """The daemon's own listen address (a wildcard means this machine's loopback) and AUTH_KEY."""
    source = f"address from {path}" if path else "address from the defaults and environment"
    if cfg.http.port == 0:
        raise CtlError(f"http.port is 0 ({source}): the port is chosen at start, use --url", USAGE)
    host = _WILDCARDS.get(cfg.http.host, cfg.http.host)
    url = URL.build(scheme="http", host=host, port=cfg.http.port)
    return Target(url, cfg.auth.auth_key, source)


def target_from_url(text: str, environ: Mapping[str, str]) -> Target:
    """`--url` plus the key in $BASE_WORKER_KEY."""
    try:
        url = URL(text)
    except ValueError:
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        raise CtlError("--url must be an http:// or https:// URL with a host", USAGE)
    key = environ.get(KEY_VARIABLE, "").strip()  # as the daemon strips what it is offered
    if not key:
        raise CtlError(f"--url needs the worker's AUTH_KEY in ${KEY_VARIABLE}", USAGE)
    # Credentials in the URL are neither sent (the key goes in Authorization) nor printed.
    bare = url.with_user(None).with_query(None).with_fragment(None)
    return Target(bare, key, "address from --url")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error  # "Connect call failed" says less than the errno does
        if error.errno and error.errno > 0:
            return os.strerror(error.errno).lower()
        return (error.strerror or str(error)).lower()
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class Client:
    """The worker's HTTP API, each call answering parsed JSON or raising a CtlError."""

    def __init__(self, target: Target, session: aiohttp.ClientSession) -> None:
        self.target = target
        self._session = session
        self._auth = {"Authorization": target.key}

    def _url(self, path: str) -> URL:
        return self.target.url.with_path(self.target.url.path.rstrip("/") + path)

    def unreachable(self, exc: BaseException) -> Unreachable:
        target = self.target
        return Unreachable(f"cannot reach the worker at {target} ({target.source}): {_reason(exc)}")

    async def call(self, method: str, path: str, body: Any = None, **query: str) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)
        url = self._url(path)
        try:
            async with self._session.request(
                method, url, json=body, params=query, headers=self._auth, timeout=timeout
            ) as resp:
                text = await resp.text(errors="replace")
                status, reason = resp.status, resp.reason or ""
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise self.unreachable(exc) from None
        except aiohttp.ClientError as exc:
            raise CtlError(f"{method} {url.path} failed: {_reason(exc)}") from None
        except ValueError:  # aiohttp's message may quote the header, that is the key
            raise CtlError(_UNSENDABLE) from None
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if status >= 400:
            raise CtlError(_refusal(method, url.path, status, reason, answer), status=status)
        if not isinstance(answer, dict):
            raise CtlError(f"{method} {url.path} answered {status} without a JSON object")
        return answer

    @asynccontextmanager
    async def stream(self, path: str, **query: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open streaming answer (no overall timeout); a refusal raises like `call`."""
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=None)
        url = self._url(path)
        try:
            resp = await self._session.get(url, params=query, headers=self._auth, timeout=timeout)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise self.unreachable(exc) from None
        except ValueError:
            raise CtlError(_UNSENDABLE) from None
        async with resp:
            if resp.status >= 400:
                text = await resp.text(errors="replace")
                try:
                    answer = json.loads(text)
                except ValueError:
                    answer = None
                refusal = _refusal("GET", url.path, resp.status, resp.reason or "", answer)
                raise CtlError(refusal, status=resp.status)
            yield resp


_UNSENDABLE = "the key holds a character an HTTP header cannot carry (a line break?)"


def _refusal(method: str, path: str, status: int, reason: str, answer: Any) -> str:
    error = answer.get("error") if isinstance(answer, dict) else None
    dead_letters = path.endswith(("/deadletters", "/redeliver", "/purge"))
    if status == 404 and dead_letters and error in (None, "Not Found"):
        return (
            f"this worker has no dead letter endpoints ({method} {path} answered 404): "
            "it is older than this command, or runs without them"
        )
    if isinstance(error, str) and error:
        return f"{error} (HTTP {status})"
    return f"{method} {path} answered HTTP {status} {reason}".rstrip()


# Output for people: colour on a terminal only, columns aligned.


class Paint:
    """ANSI colours when enabled (stdout is a terminal and NO_COLOR is unset)."""

    _CODES = {"green": "32", "yellow": "33", "red": "31", "bold": "1", "dim": "2"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, colour: str) -> str:
        if not self.enabled or not text:
            return text
        return f"\033[{self._CODES[colour]}m{text}\033[0m"

    def state(self, text: str) -> str:
        colour = {"ready": "green", "up": "green", "maintenance": "yellow", "restarting": "yellow"}
        return self(text, colour.get(text, "red"))


def columns(rows: Sequence[Sequence[str]], widths_of: Sequence[Sequence[str]] | None = None) -> str:
    """Rows as aligned columns (two spaces apart, the last column unpadded). `widths_of` gives
    the uncoloured text of each cell when `rows` carries colour codes."""
    plain = widths_of or rows
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in plain) for i in range(len(plain[0]) - 1)]
    lines = []
    for row, bare in zip(rows, plain, strict=True):
        cells = [cell + " " * (widths[i] - len(bare[i])) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """`3d 4h`, `2h 5m`, `5m 3s`, `12s`: two units at most, as people read an uptime."""
    total = int(seconds)
    units = [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)]
    parts: list[str] = []
    for name, size in units:
        if total >= size or (name == "s" and not parts):
            parts.append(f"{total // size}{name}")
            total %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def dead_letter_count(health: Mapping[str, Any]) -> int | None:
    """`webhooks.dead` of a detailed /health, when the daemon reports it (else None)."""
    webhooks = health.get("webhooks")
    value = webhooks.get("dead") if isinstance(webhooks, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _links(balancer: Mapping[str, Any], paint: Paint) -> tuple[str, str]:
    """The load balancer links in one line, coloured and plain."""
    said: list[tuple[str, str]] = []
    inbound = balancer.get("inbound")
    if isinstance(inbound, dict):
        if inbound.get("port"):
            count = inbound.get("connections", 0)
            text = f"inbound :{inbound['port']}, {count} connected"
            said.append((text, text))
        else:
            said.append(("inbound off", "inbound off"))
    if "enabled" in balancer:
        if not balancer.get("enabled"):
            said.append(("outbound off", "outbound off"))
        elif balancer.get("connected"):
            text = f"outbound {balancer.get('url')} "
            said.append((text + paint("connected", "green"), text + "connected"))
        else:
            text = f"outbound {balancer.get('url')} "
            error = balancer.get("lastError")
            tail = f" ({error})" if error else ""
            said.append((text + paint("disconnected", "red") + tail, text + "disconnected" + tail))
    if not said:
        return "none", "none"
    return "; ".join(s[0] for s in said), "; ".join(s[1] for s in said)


def status_screen(health: Mapping[str, Any], target: Target, paint: Paint) -> str:
    """One screen for people out of a detailed /health."""
    slots = health.get("slots", {})
    status = str(health.get("status", "?"))
    rows: list[tuple[str, str, str]] = [  # label, coloured value, plain value
        ("status", paint.state(status), status),
        ("worker", f"{target}  group {health.get('group')}, contract {health.get('contract')}", ""),
        ("slots", f"{slots.get('used', '?')}/{slots.get('limit', '?')} used", ""),
        ("queue", f"{slots.get('queue', '?')} waiting", ""),
    ]
    webhooks = health.get("webhooks")
    if isinstance(webhooks, dict) and "pending" in webhooks:
        rows.append(("webhooks", f"{webhooks['pending']} pending", ""))
    dead = dead_letter_count(health)
    if dead is not None:
        rows.append(("dead letters", paint(str(dead), "red") if dead else "0", str(dead)))
    balancer = health.get("loadBalancer")
    if isinstance(balancer, dict):
        coloured, plain = _links(balancer, paint)
        rows.append(("load balancer", coloured, plain))
    services = health.get("services") or []
    if services:
        shown = [(s.get("name", "?"), str(s.get("state", "?"))) for s in services]
        coloured = ", ".join(f"{name} {paint.state(state)}" for name, state in shown)
        rows.append(("services", coloured, ", ".join(f"{n} {s}" for n, s in shown)))
    else:
        rows.append(("services", "none", ""))
    rows.append(("version", str(health.get("version", "?")), ""))
    uptime = health.get("system", {}).get("uptime")
    rows.append(("uptime", duration(uptime) if isinstance(uptime, int | float) else "?", ""))
    table = [(paint(label, "bold"), value) for label, value, _ in rows]
    bare = [(label, plain or value) for label, value, plain in rows]
    return columns(table, bare)


def _when(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    return str(value) if value is not None else ""


def dead_letter_table(answer: Mapping[str, Any], paint: Paint) -> str:
    letters = answer.get("deadletters") or []
    if not letters:
        return "no dead letters"
    header = ("TASK ID", "FUNCTION", "ATTEMPTS", "FAILED AT", "TARGET", "ERROR")
    rows = [
        tuple(
            str(v)
            for v in (
                letter.get("task_id", ""),
                letter.get("function", ""),
                letter.get("attempts", ""),
                _when(letter.get("failed_at")),
                letter.get("target", ""),
                letter.get("error", ""),
            )
        )
        for letter in letters
    ]
    shown = [tuple(paint(h, "bold") for h in header), *rows]
    return columns(shown, [header, *rows])


# The commands.


@dataclass
class Io:
    """Where the output goes, and whether it may be coloured."""

    out: TextIO
    err: TextIO
    paint: Paint

    def print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def notice(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def json(self, value: Any) -> None:
        self.print(json.dumps(value, indent=2, ensure_ascii=False))


async def status(client: Client, io: Io, as_json: bool) -> int:
    health = await client.call("GET", "/health")
    if "slots" not in health:
        raise CtlError(
            f"the worker at {client.target} did not accept the key: /health answered only "
            f"its public view (status {health.get('status', '?')})"
        )
    if as_json:
        io.json(health)
    else:
        io.print(status_screen(health, client.target, io.paint))
    return OK if health.get("status") == "ready" else NOT_READY


async def switch(client: Client, io: Io, path: str, as_json: bool) -> int:
    answer = await client.call("POST", path)
    if as_json:
        io.json(answer)
    else:
        state = io.paint.state(str(answer.get("status")))
        io.print(f"{answer.get('message', 'done')} (status {state})")
    return OK


async def logs(client: Client, io: Io, lines: int | None) -> int:
    query = {} if lines is None else {"lines": str(lines)}
    answer = await client.call("GET", "/logs", **query)
    for line in answer.get("logs", []):
        io.print(line)
    return OK


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The lines of a streaming answer, however its chunks are cut (no length limit)."""
    pending = b""
    async for chunk in resp.content.iter_any():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


async def _missed_lines(client: Client, lost_at: float) -> int:
    """How many kept lines to ask for when following again: all of them if the worker restarted
    since the connection was lost (each of its lines is new), none if it is the same process."""
    health = await client.call("GET", "/health")
    uptime = health.get("system", {}).get("uptime")
    restarted = isinstance(uptime, int | float) and uptime < time.time() - lost_at
    return ALL_LINES if restarted else 0


async def follow(client: Client, io: Io, backlog: int) -> int:
    """`logs -f`: print lines as they are written; when the worker goes away (a restart, a
    network cut), say so on stderr and reconnect with backoff until it is back. Ends with Ctrl-C."""
    lost_at: float | None = None
    delay = RECONNECT_FIRST
    connected_once = False
    while True:
        try:
            count = backlog if lost_at is None else await _missed_lines(client, lost_at)
            async with client.stream("/logs", follow="1", lines=str(count)) as resp:
                if lost_at is not None:
                    io.notice("-- reconnected --")
                lost_at, delay, connected_once = None, RECONNECT_FIRST, True
                async for line in _lines(resp):
                    io.print(line)
        except BrokenPipeError:
            raise  # our reader left (`| head`), not the worker
        except Unreachable:
            if not connected_once:
                raise
        except CtlError as exc:
            # A proxy in front of a restarting worker answers 502 or 503 for a while.
            if not connected_once or exc.status is None or exc.status < 500:
                raise
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            pass  # cut off while streaming: reconnect below
        # The stream ended: the worker stopped (it closes followers) or the connection broke.
        if lost_at is None:
            io.notice("-- connection lost, reconnecting --")
            lost_at = time.time()
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 2, RECONNECT_MAX)


async def dead_letters(client: Client, io: Io, args: argparse.Namespace) -> int:
    action = args.dl_action or "list"
    if action == "list":
        answer = await client.call("GET", "/deadletters")
        if args.json:
            io.json(answer)
        else:
            io.print(dead_letter_table(answer, io.paint))
        return OK
    body: dict[str, Any] = {"all": True} if args.all else {"task_ids": list(args.ids)}
    answer = await client.call("POST", f"/deadletters/{action}", body)
    if args.json:
        io.json(answer)
    elif action == "redeliver":
        io.print(f"redelivering {answer.get('redelivering', '?')} dead letters")
    else:
        io.print(f"purged {answer.get('purged', '?')} dead letters")
    return OK


async def run(args: argparse.Namespace, target: Target, io: Io) -> int:
    """One command against the worker at `target`."""
    async with aiohttp.ClientSession() as session:
        client = Client(target, session)
        command = args.ctl_command
        if command == "status":
            return await status(client, io, args.json)
        if command in ("on", "off"):
            return await switch(client, io, f"/{command}", args.json)
        if command == "logs" and args.follow:
            return await follow(client, io, FOLLOW_BACKLOG if args.lines is None else args.lines)
        if command == "logs":
            return await logs(client, io, args.lines)
        return await dead_letters(client, io, args)


# Bash completion, derived from the parser so that it names every command and option.


def _options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices


def _paths(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    """Every (command path, words that may follow it), deepest first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _paths(sub, (*path, name))
    words = list(_options(parser))
    for action in parser._actions:
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            words += [str(choice) for choice in action.choices]
    yield path, words


def completion(parser: argparse.ArgumentParser, program: str = "base-worker") -> str:
    """A bash completion script for `program` (`source <(base-worker ctl completion bash)`)."""
    arms = []
    for path, words in _paths(parser):
        pattern = "".join(f'*" {word} "' for word in path) + "*"
        arms.append(f'        {pattern}) words="{" ".join(words)}" ;;')
    function = "_" + program.replace("-", "_")
    return "\n".join(
        [
            f"# bash completion for {program}: source <({program} ctl completion bash)",
            f"{function}() {{",
            '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" words',
            '    if [[ "$prev" == --config ]]; then',
            '        mapfile -t COMPREPLY < <(compgen -f -- "$cur")',
            "        return",
            "    fi",
            '    case " ${COMP_WORDS[*]:1:COMP_CWORD-1} " in',
            *arms,
            "    esac",
            '    mapfile -t COMPREPLY < <(compgen -W "$words" -- "$cur")',
            "}",
            f"complete -F {function} {program}",
        ]
    )


def main(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    load: Callable[[], tuple[Config, Path | None]],
    environ: Mapping[str, str],
) -> int:
    """Run `base-worker ctl ...` as parsed into `args`; returns the exit code."""
    if args.ctl_command == "completion":
        print(completion(parser))
        return OK
    io = Io(sys.stdout, sys.stderr, Paint(sys.stdout.isatty() and not environ.get("NO_COLOR")))
    key = ""
    following = args.ctl_command == "logs" and args.follow
    try:
        if args.url:
            target = target_from_url(args.url, environ)
        else:
            try:
                cfg, path = load()
            except ConfigError as exc:
                raise CtlError(f"config error: {exc}") from None
            target = target_from_config(cfg, path)
        key = target.key
        return asyncio.run(run(args, target, io))
    except CtlError as exc:
        message = exc.message.replace(key, "***") if key else exc.message
        io.notice(f"base-worker ctl: {message}")
        return exc.code
    except KeyboardInterrupt:
        return OK if following else INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from failing at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
