"""Write base-worker(1) in roff from the argparse parser of worker/cli.py, so it cannot go stale.

Usage: python packaging/manpage.py > base-worker.1 (the Debian build does this). The date comes from
SOURCE_DATE_EPOCH when set, so a rebuild gives the same page.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator

from worker import __version__, cli, config


def roff(text: str) -> str:
    """Escape text for roff: backslashes, hyphens and a leading control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand, depth first, as ("ctl status", parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for deeper, subsub in subcommands(sub):
                    yield f"{name} {deeper}", subsub


def options(parser: argparse.ArgumentParser) -> Iterator[str]:
    """One .TP entry per option and positional argument of ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names = ", ".join(f"\\fB{roff(name)}\\fR" for name in action.option_strings)
            if action.nargs != 0:
                metavar = action.metavar or action.dest.upper()  # as argparse shows it
                names += f" \\fI{roff(str(metavar))}\\fR"
        else:
            names = f"\\fI{roff(str(action.metavar or action.dest))}\\fR"
        help_text = (action.help or "") % {"default": action.default, "prog": parser.prog}
        yield f".TP\n{names}\n{roff(help_text)}"


def page(parser: argparse.ArgumentParser, date: str) -> str:
    lines = [
        f'.TH BASE\\-WORKER 1 "{date}" "base-worker {__version__}" "User Commands"',
        ".SH NAME",
        f"base\\-worker \\- {roff(parser.description or '')}",
        ".SH SYNOPSIS",
        f"\\fBbase\\-worker\\fR {roff(' '.join(parser.format_usage().split()[2:]))}",
        ".SH DESCRIPTION",
        "Serves until stopped. Without \\fB\\-\\-config\\fR it reads \\fI$BASE_WORKER_CONFIG\\fR,"
        " else \\fI/etc/base\\-worker/config.toml\\fR if it exists, else built\\-in defaults"
        " plus environment variables. Precedence: defaults, then the file, then the environment,"
        " then command\\-line flags.",
        ".SH OPTIONS",
        *options(parser),
    ]
    subs = list(subcommands(parser))
    if subs:
        lines.append(".SH COMMANDS")
        for name, sub in subs:
            lines += [f'.SS "{roff(name)}"', roff(sub.description or sub.format_usage().strip())]
            lines += list(options(sub))
    lines += [".SH ENVIRONMENT", "Each overrides its configuration key; units in parentheses."]
    for opt in config.options():
        if opt.meta["env"]:
            unit = f" ({opt.meta['unit']})" if opt.meta["unit"] in ("ms", "size", "json") else ""
            lines += [".TP", f"\\fB{roff(opt.meta['env'])}\\fR", roff(f"{opt.name}{unit}")]
    lines += [
        ".SH FILES",
        ".TP",
        "\\fI/etc/base\\-worker/config.toml\\fR",
        "The configuration (a conffile of the Debian package).",
        ".TP",
        "\\fI/etc/base\\-worker/keys.toml\\fR",
        "auth_key and lb_auth_key, generated at first install (auth.keys_file).",
        ".TP",
        "\\fI/etc/base\\-worker/functions/\\fR",
        "Function modules loaded by the packaged configuration.",
        ".TP",
        "\\fI/var/lib/base\\-worker/\\fR",
        "State directory (maintenance mode across restarts).",
        ".SH SIGNALS",
        "SIGHUP reloads the configuration; SIGTERM drains (tasks in flight finish) and exits;"
        " a second SIGTERM or SIGINT stops at once.",
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1),"
        " \\fI/usr/share/doc/base\\-worker/install.md.gz\\fR",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    sys.stdout.write(page(cli._parser(), date))


if __name__ == "__main__":
    main()
