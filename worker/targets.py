"""Where a webhook may go and what it may carry: header rules, the target policy, and what is
logged of a target URL. Pure rules, below everything else, so that the config (at load), the
envelope (at submit) and the deliveries (at every attempt) all apply the same ones."""

from __future__ import annotations

import re
from collections.abc import Mapping

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 tchar
_BAD_VALUE = re.compile(r"[\r\n\x00]")
# Headers that frame the message, route it, or are the worker's own word to the receiver.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "content-type",
        "user-agent",
        "x-task-id",
        "x-signature-256",
    }
)
RESERVED_PREFIXES = ("proxy-", "x-webhook-")
_SHOWN = 60  # characters of a bad header name repeated in a message


def _shown(name: str) -> str:
    return repr(name if len(name) <= _SHOWN else name[:_SHOWN] + "...")


def header_problems(headers: Mapping[str, str]) -> list[str]:
    """One message per header that may not be sent as given, naming the header (never its
    value); empty when every header is fine."""
    problems = []
    for name, value in headers.items():
        lowered = name.lower()
        if not _TOKEN.match(name):
            problems.append(f"Header name {_shown(name)} is not an HTTP token.")
        elif lowered in RESERVED_HEADERS or lowered.startswith(RESERVED_PREFIXES):
            problems.append(f"Header {_shown(name)} may not be set: the worker sets or forbids it.")
        elif _BAD_VALUE.search(value):
            problems.append(f"Header {_shown(name)} has a value containing CR, LF or NUL.")
    return problems
