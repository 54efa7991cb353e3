"""Who may call what: the AUTH_KEY and LB_AUTH_KEY rules, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from worker.config import AuthSection
from worker.errors import Unauthorized

LB_HEADER = "x-lb-auth"


def _offered(value: str) -> str:
    value = value.strip()
    # The seventh character first: a bare key, the usual value, is then told apart without
    # slicing and lowering the first seven characters of every request's header.
    if value[6:7] == " " and value[:6].lower() == "bearer":
        return value[7:].strip()
    return value


def matches(value: str | None, key: str) -> bool:
    """True when the header value (optionally `Bearer `-prefixed) equals a configured key."""
    if value is None or not key:
        return False
    offered = _offered(value)
    if offered.isascii() and key.isascii():
        return hmac.compare_digest(offered, key)  # as the bytes below, without two encodes
    # aiohttp decodes header bytes that are not UTF-8 as surrogates; they must fail, not raise.
    return hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), key.encode())


def require_operator(headers: Mapping[str, str], keys: AuthSection) -> None:
    """POST /task, /on, /off: AUTH_KEY in Authorization; an x-lb-auth, if sent, must be right."""
    if not matches(headers.get("Authorization"), keys.auth_key):
        raise Unauthorized("Missing or invalid Authorization header")
    if LB_HEADER in headers and not matches(headers.get(LB_HEADER), keys.lb_auth_key):
        raise Unauthorized("Invalid x-lb-auth header")


def who(headers: Mapping[str, str]) -> str:
    """Who asked, for the audit line of an operator request that passed `require_operator`."""
    return "load balancer" if LB_HEADER in headers else "operator"


def require_any(headers: Mapping[str, str], keys: AuthSection) -> None:
    """GET /logs: AUTH_KEY in Authorization or LB_AUTH_KEY in x-lb-auth."""
    if not (
        matches(headers.get("Authorization"), keys.auth_key)
        or matches(headers.get(LB_HEADER), keys.lb_auth_key)
    ):
        raise Unauthorized("Missing or invalid credentials")


def sees_details(headers: Mapping[str, str], keys: AuthSection) -> bool:
    """GET /health: either key in either header unlocks the detailed view."""
    offered = (headers.get("Authorization"), headers.get(LB_HEADER))
    return any(
        matches(value, key) for value in offered for key in (keys.auth_key, keys.lb_auth_key)
    )
