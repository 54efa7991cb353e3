"""The command line: `base-worker [--config PATH] [--check] [--host ...]` serves (or checks);
`base-worker ctl ...` talks to a running worker (its client lives in `worker.ctl`)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker import __version__, config, functions
from worker.errors import ConfigError

EXIT_CODES = """exit codes:
  0  done
  1  error (the worker refused, with its reason; a bad config)
  2  usage
  3  the worker is not ready (status: maintenance, draining, ...)
  4  cannot reach the worker (refused, timed out)"""


class _Formatter(argparse.HelpFormatter):
    """Wraps prose, keeps indented lines (the exit code table) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            line if line.startswith(" ") else textwrap.fill(line, width, initial_indent=indent)
            for line in text.splitlines()
        )


def _add_ctl(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """`base-worker ctl ...`: declared here (argparse only), run by worker.ctl."""
    ctl = commands.add_parser(
        "ctl",
        help="talk to a running worker: status, on, off, logs, dead letters",
        description="Talk to a running worker over its HTTP API. The address and the key come "
        "from the daemon's own config file (--config, else $BASE_WORKER_CONFIG, else "
        "/etc/base-worker/config.toml, plus the environment overrides), or from --url plus "
        "the key in $BASE_WORKER_KEY. The key is never printed.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    where = ctl.add_mutually_exclusive_group()
    where.add_argument(
        "--config",
        dest="ctl_config",
        type=Path,
        metavar="PATH",
        help="the daemon's config file, for its address and auth.auth_key",
    )
    where.add_argument(
        "--url",
        help="the worker's base URL (e.g. http://10.0.0.5:3000); the key is read from "
        "$BASE_WORKER_KEY",
    )
    actions = ctl.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str = "") -> argparse.ArgumentParser:
        return actions.add_parser(
            name,
            help=help,
            description=description or help[0].upper() + help[1:] + ".",
            epilog=EXIT_CODES,
            formatter_class=_Formatter,
        )

    def json_flag(parser: argparse.ArgumentParser, default: Any = False) -> None:
        parser.add_argument(
            "--json", action="store_true", default=default, help="print the answer as JSON"
        )

    status = command(
        "status",
        "show the worker's state on one screen",
        "Show status, slots, queue, pending webhooks, dead letters, load balancer links, "
        "services, version and uptime. Exits 3 when the worker is not ready.",
    )
    status.add_argument(
        "--json", action="store_true", help="print the detailed /health object as JSON"
    )
    json_flag(command("on", "leave maintenance mode: accept new tasks again"))
    json_flag(
        command(
            "off",
            "enter maintenance mode: refuse new tasks",
            "Enter maintenance mode: new tasks get 503; tasks running or queued finish.",
        )
    )
    logs = command(
        "logs",
        "print the worker's recent log lines, or follow them",
        "Print the log lines the worker keeps (masked as in GET /logs). With -f, keep "
        "printing new lines; when the worker restarts, a notice goes to stderr and the "
        "command reconnects until it is back. Ctrl-C ends it (exit 0).",
    )
    logs.add_argument(
        "-n", "--lines", type=_count, metavar="N", help="the last N lines (-f: default 10)"
    )
    logs.add_argument("-f", "--follow", action="store_true", help="follow new lines, like tail -f")
    dead = command(
        "deadletters",
        "list, redeliver or purge dead letters",
        "Webhook tasks whose delivery failed after the last retry. Without an action: list.",
    )
    json_flag(dead)
    dead_actions = dead.add_subparsers(dest="dl_action", metavar="ACTION")
    for name, help in (
        ("list", "list the dead letters"),
        ("redeliver", "deliver dead letters again"),
        ("purge", "delete dead letters"),
    ):
        action = dead_actions.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=EXIT_CODES,
            formatter_class=_Formatter,
        )
        json_flag(action, argparse.SUPPRESS)
        if name != "list":
            action.add_argument("ids", nargs="*", metavar="ID", help="task ids")
            action.add_argument("--all", action="store_true", help="every dead letter")
    complete = command("completion", "print a shell completion script")
    complete.add_argument("shell", choices=["bash"], help="the shell (bash)")
    return ctl


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="base-worker",
        description="Serve function calls over HTTP in prioritised parallel slots.",
        epilog="`base-worker ctl --help` for the operator commands.",
    )
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config, import every function, print their names and exit",
    )
    parser.add_argument("--version", action="version", version=f"base-worker {__version__}")
    for opt in config.options():
        if opt.meta["flag"]:
            parser.add_argument(opt.flag, dest=opt.name, help=f"{opt.meta['help']} ({opt.name})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_ctl(commands)
    return parser


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """Flag values converted like environment variables (same parser, same messages)."""
    flags: dict[str, Any] = {}
    for opt in config.options():
        text = getattr(args, opt.name, None)
        if opt.meta["flag"] and text is not None:
            try:
                flags[opt.name] = config.parse_text(opt, text)
            except ValueError as exc:
                raise ConfigError(f"{opt.name} (from {opt.flag}): {exc}") from None
    return flags


def load_config(args: argparse.Namespace) -> tuple[config.Config, Path | None]:
    path = args.config or config.default_path(os.environ)
    return config.load(path, os.environ, _flags(args)), path


def _ctl(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    action = getattr(args, "dl_action", None)
    if action in ("redeliver", "purge") and bool(args.ids) == args.all:
        _subparser(parser, "ctl", "deadletters", action).error("give task ids or --all (not both)")
    args.config = args.ctl_config or args.config
    from worker import ctl  # only now: the daemon's start-up does not pay for the client

    return ctl.main(args, parser, lambda: load_config(args), os.environ)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "ctl":
        sys.exit(_ctl(parser, args))
    try:
        cfg, path = load_config(args)
    except ConfigError as exc:
        sys.exit(f"base-worker: config error: {exc}")
    if args.check:
        try:
            registry = functions.load(cfg.worker.functions)
        except functions.LoadError as exc:
            sys.exit(f"base-worker: {exc}")
        for name in registry.functions:
            print(name)
        for name in registry.services:
            print(f"service {name}")
        return
    from worker.lifecycle import run

    sys.exit(run(cfg, path, _flags(args)))
