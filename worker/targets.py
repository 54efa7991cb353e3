"""Where a webhook may go and what it may carry: header rules, the target policy, and what is
logged of a target URL. Pure rules, below everything else, so that the config (at load), the
envelope (at submit) and the deliveries (at every attempt) all apply the same ones."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from yarl import URL

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


def check_header_target(text: str) -> None:
    """ValueError (one line) unless `text` is a `webhook.header_targets` prefix: an http(s)
    URL with a host and no userinfo, query or fragment."""
    try:
        parsed = URL(text)
    except ValueError:
        parsed = None
    if (
        parsed is None
        or parsed.scheme not in ("http", "https")
        or not parsed.raw_host
        or parsed.raw_user is not None
        or parsed.raw_query_string
        or parsed.raw_fragment
    ):
        raise ValueError(
            f"{text!r} is not an http:// or https:// URL prefix with a host "
            "(and no user, query or fragment)"
        )


def header_target_matches(url: str, prefix: str) -> bool:
    """Whether `url` is under `prefix`: same scheme, host and port, and a path that starts with
    the prefix's path at a segment boundary (so https://api.example.com never matches
    https://api.example.com.evil.test or https://api.example.com@evil.test)."""
    try:
        target, under = URL(url), URL(prefix)
    except ValueError:
        return False
    if (
        target.scheme != under.scheme
        or (target.raw_host or "").lower().rstrip(".") != (under.raw_host or "").lower().rstrip(".")
        or target.port != under.port
    ):
        return False
    base, path = under.raw_path, target.raw_path or "/"
    if base in ("", "/") or base.endswith("/"):
        return path.startswith(base or "/")
    return path == base or path.startswith(base + "/")


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Refused unless an allow entry inside the same range names the address (a host name, or a
# wider network such as 0.0.0.0/0, does not): cloud metadata services live on link-local.
ALWAYS_REFUSED: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(network), why)
    for network, why in (
        ("169.254.0.0/16", "a link-local address"),
        ("fe80::/10", "a link-local address"),
        ("0.0.0.0/8", "an unspecified address"),
        ("::/128", "an unspecified address"),
        ("224.0.0.0/4", "a multicast address"),
        ("ff00::/8", "a multicast address"),
        ("255.255.255.255/32", "a broadcast address"),
    )
)
# refusal_of_url answers a policy keeps, at most 2 MiB of URLs: then it starts again.
DECISIONS_KEPT = 1024
DECIDED_URL_LENGTH = 2048
_HOST_NAME = re.compile(
    r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$"
)


class TargetRefused(OSError):
    """A webhook target the policy refuses; the message says why (never the URL's query)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One `webhook.allow` or `webhook.deny` entry: a network (an address is a /32 or /128) or
    a host name (`*.example.org` for every name below example.org)."""

    network: Network | None = None
    host: str | None = None

    def names(self, host: str) -> bool:
        if self.host is None:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


def parse_entry(text: str) -> Entry:
    """An entry as written in the config; ValueError with a one-line reason when it is none."""
    cleaned = text.strip().lower().rstrip(".")
    try:
        return Entry(network=ipaddress.ip_network(cleaned, strict=True))
    except ValueError as exc:
        if "/" in cleaned or ":" in cleaned or cleaned.replace(".", "").isdigit():
            raise ValueError(f"{text!r} is not an IP address or CIDR network ({exc})") from None
    if not _HOST_NAME.match(cleaned):
        raise ValueError(
            f"{text!r} is not a host name, an IP address or a CIDR network "
            "(no scheme, port or path: ports cannot be named)"
        )
    return Entry(host=cleaned)


def parse_entries(texts: Iterable[str]) -> tuple[Entry, ...]:
    return tuple(parse_entry(text) for text in texts)


def literal_address(host: str) -> Address | None:
    """The address of an IP-literal host (as aiohttp tells them from names), else None;
    ValueError for something that looks like an address but is none (`127.1`)."""
    if ":" not in host and not host.replace(".", "").isdigit():
        return None
    return _address(host)


def _address(text: str) -> Address:
    address = ipaddress.ip_address(text.split("%", 1)[0])  # a zone (fe80::1%eth0) is no help
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_local(address: Address) -> bool:
    """Loopback, or an address of this machine: only those can be bound."""
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def loggable(url: str) -> str:
    """What is logged of a target: scheme, host, port and path; never query, fragment or
    userinfo."""
    try:
        parsed = URL(url)
        host = parsed.raw_host or ""
        port = parsed.explicit_port
        path = parsed.raw_path
    except (ValueError, TypeError):
        return "<invalid URL>"
    if not parsed.absolute or not host:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parsed.scheme}://{host}{'' if port is None else f':{port}'}{path}"


def scrub(text: str, url: str) -> str:
    """`text` (an exception's message, say) with `url` shown as `loggable(url)` and any trace
    of its query, fragment or userinfo removed."""
    shown = loggable(url)
    try:
        parsed = URL(url)
        forms = {url, str(parsed), repr(str(parsed))[1:-1], parsed.human_repr()}
        secrets = [
            parsed.raw_query_string,
            parsed.query_string,
            parsed.raw_fragment,
            parsed.fragment,
            parsed.raw_user or "",
            parsed.user or "",
            parsed.raw_password or "",
            parsed.password or "",
        ]
    except (ValueError, TypeError):
        forms, secrets = {url}, []
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, shown)
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class TargetPolicy:
    """Which addresses a webhook may connect to: `webhook.allow`, `webhook.deny`, the ranges
    refused unless allowed explicitly, and the worker's own ports on any local address."""

    def __init__(
        self, allow: Iterable[str], deny: Iterable[str], own_ports: Collection[int] = ()
    ) -> None:
        self.allow = parse_entries(allow)
        self.deny = parse_entries(deny)
        self.own_ports = frozenset(p for p in own_ports if p)
        # refusal_of_url's answers by URL: they depend on the URL and this (unchanging) policy
        # only, except where a port of ours asks the machine whether an address is local.
        self._decided: dict[str, str | None] = {}

    def refusal(self, address: Address, port: int, host: str | None = None) -> str | None:
        """Why connecting to `address`:`port` (reached as `host`) is refused, or None."""
        address = _address(str(address))
        name = _name(host)
        shown = f"{address}" if name is None or name == str(address) else f"{name} ({address})"
        if any(_matches(entry, address, name) for entry in self.deny):
            return f"target {shown} is denied by webhook.deny"
        if port in self.own_ports and is_local(address):
            return f"target {shown} port {port} is this worker's own port on a local address"
        for network, why in ALWAYS_REFUSED:
            if address.version == network.version and address in network:
                if not any(_names_inside(entry, address, network) for entry in self.allow):
                    return (
                        f"target {shown} is {why}, refused unless webhook.allow names it "
                        "(an address or a network inside that range)"
                    )
                return None
        if self.allow and not any(_matches(entry, address, name) for entry in self.allow):
            return f"target {shown} is not in webhook.allow"
        return None

    def refusal_of_url(self, url: str) -> str | None:
        """Why `url` is refused before any lookup: by its literal address, or its host name
        alone; None when it may be tried (addresses are checked again once resolved)."""
        try:
            return self._decided[url]
        except KeyError:
            pass
        refusal, asked_the_machine = self._decide(url)
        if not asked_the_machine and len(url) <= DECIDED_URL_LENGTH:
            if len(self._decided) >= DECISIONS_KEPT:
                self._decided.clear()
            self._decided[url] = refusal
        return refusal

    def _decide(self, url: str) -> tuple[str | None, bool]:
        try:
            parsed = URL(url)
            host = parsed.raw_host or ""
            port = parsed.port or 0
            address = literal_address(host)
        except ValueError:
            return "target host is not a valid host name or IP address", False
        if address is not None:
            return self.refusal(address, port, host), port in self.own_ports
        name = _name(host)
        assert name is not None
        if any(entry.names(name) for entry in self.deny):
            return f"target {name} is denied by webhook.deny", False
        if (
            self.allow
            and not any(entry.names(name) for entry in self.allow)
            and all(entry.network is None for entry in self.allow)
        ):
            return f"target {name} is not in webhook.allow", False
        return None, False


def _name(host: str | None) -> str | None:
    return host.lower().rstrip(".") if host else None


def _matches(entry: Entry, address: Address, name: str | None) -> bool:
    if entry.network is not None:
        return entry.network.version == address.version and address in entry.network
    return name is not None and entry.names(name)


def _names_inside(entry: Entry, address: Address, refused: Network) -> bool:
    network = entry.network
    return (
        network is not None
        and network.version == refused.version
        and address in network
        and network.subnet_of(refused)  # type: ignore[arg-type]
    )
