"""The command line: `base-worker [--config PATH] [--check] [--host ...]`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker import __version__, config, functions
from worker.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="base-worker",
        description="Serve function calls over HTTP in prioritised parallel slots.",
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


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
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
