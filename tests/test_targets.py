"""The target policy and the header rules as pure functions (worker/targets.py)."""

from __future__ import annotations

import ipaddress

import pytest

from tests.conftest import make_config
from worker import targets
from worker.errors import ConfigError
from worker.targets import TargetPolicy, is_local, loggable, scrub


def address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("::ffff:169.254.169.254", "link-local"),  # an IPv4-mapped address is the IPv4 one
    ],
)
def test_ranges_refused_unless_allowed_explicitly(target: str, why: str) -> None:
    refusal = TargetPolicy([], []).refusal(address(target), 80)
    assert refusal is not None and why in refusal
    # A wide allow entry or a host name does not name them; an entry inside the range does.
    assert TargetPolicy(["0.0.0.0/0", "::/0", "metadata"], []).refusal(
        address(target), 80, "metadata"
    )
    inside = str(ipaddress.ip_network(target.replace("::ffff:", "")))
    assert TargetPolicy([inside], []).refusal(address(target), 80) is None


def test_allow_and_deny_by_name_address_and_network() -> None:
    policy = TargetPolicy(["hooks.example.org", "*.corp.example", "10.0.0.0/8", "2001:db8::1"], [])
    assert policy.refusal(address("192.0.2.1"), 443, "hooks.example.org") is None
    assert policy.refusal(address("192.0.2.1"), 443, "a.b.corp.example") is None
    assert policy.refusal(address("192.0.2.1"), 443, "corp.example") is not None
    assert policy.refusal(address("10.1.2.3"), 443, "anything.test") is None
    assert policy.refusal(address("2001:db8::1"), 443) is None
    assert "not in webhook.allow" in str(policy.refusal(address("192.0.2.1"), 443, "x.test"))
    deny = TargetPolicy([], ["127.0.0.0/8", "evil.test", "*.evil.test"])
    assert "webhook.deny" in str(deny.refusal(address("127.0.0.1"), 22))
    assert "webhook.deny" in str(deny.refusal(address("192.0.2.1"), 80, "EVIL.test."))
    assert deny.refusal(address("192.0.2.1"), 80, "good.test") is None
    # Deny beats allow.
    both = TargetPolicy(["10.0.0.0/8"], ["10.0.0.5"])
    assert both.refusal(address("10.0.0.5"), 80) is not None


def test_the_workers_own_ports_are_refused_on_every_local_address_only() -> None:
    policy = TargetPolicy(["0.0.0.0/0", "::/0"], [], own_ports={3000, 3001})
    for local in ("127.0.0.1", "127.0.0.2", "::1"):
        assert "own port" in str(policy.refusal(address(local), 3000))
        assert policy.refusal(address(local), 3002) is None
    assert policy.refusal(address("192.0.2.1"), 3000) is None  # TEST-NET: not ours
    assert is_local(address("127.0.0.1")) and not is_local(address("192.0.2.1"))


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[fe80::1%25eth0]:80/", "link-local"),
        ("http://127.1:8080/", "valid"),  # aiohttp would refuse it too; it is not canonical
        ("http://127.0.0.1:3000/off", "own port"),
        ("http://denied.test/hook", "webhook.deny"),
    ],
)
def test_urls_refused_before_any_lookup(url: str, refused: str) -> None:
    policy = TargetPolicy([], ["denied.test"], own_ports={3000})
    assert refused in str(policy.refusal_of_url(url))


def test_host_names_wait_for_resolution_unless_named() -> None:
    assert TargetPolicy([], []).refusal_of_url("http://hooks.example.org/") is None
    only_names = TargetPolicy(["hooks.example.org"], [])
    assert only_names.refusal_of_url("http://other.example.org/") is not None
    with_networks = TargetPolicy(["hooks.example.org", "10.0.0.0/8"], [])
    assert with_networks.refusal_of_url("http://other.example.org/") is None


@pytest.mark.parametrize(
    ("key", "entry"),
    [
        ("allow", "10.0.0.1/8"),
        ("deny", "http://example.org/"),
        ("allow", "example.org:8080"),
        ("deny", "300.1.1.1"),
        ("allow", "bad host"),
    ],
)
def test_bad_policy_entries_are_refused_at_config_load(key: str, entry: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(webhook={key: [entry]})
    message = str(caught.value)
    assert f"webhook.{key}" in message and repr(entry) in message and "\n" not in message


def test_policy_entries_load() -> None:
    cfg = make_config(webhook={"allow": ["hooks.example.org", "10.0.0.0/8"], "deny": ["::1"]})
    assert cfg.webhook.allow == ("hooks.example.org", "10.0.0.0/8")
    assert cfg.webhook.deny == ("::1",)


def test_what_is_logged_of_a_target() -> None:
    url = "https://user:pw@hooks.example.org:8443/a/b?token=SECRET#frag"
    assert loggable(url) == "https://hooks.example.org:8443/a/b"
    assert loggable("http://[::1]:8080/x?y") == "http://[::1]:8080/x"
    assert loggable("not a url at all") == "<invalid URL>"


def test_scrub_removes_every_trace_of_query_fragment_and_userinfo() -> None:
    url = "http://user:pw@127.0.0.1:8080/x?token=SECRET#frag"
    text = f"ClientResponseError: 400, url='{url}' (token=SECRET, user pw, frag)"
    cleaned = scrub(text, url)
    assert "http://127.0.0.1:8080/x" in cleaned
    for word in ("SECRET", "pw", "frag", "token"):
        assert word not in cleaned


URLS = [
    "http://169.254.169.254/latest/meta-data",
    "http://127.0.0.1:3000/off",
    "http://127.0.0.1:3001/hook?token=1",
    "http://10.0.0.5:8080/hook",
    "http://denied.test/hook",
    "http://hooks.example.org/",
    "http://127.1:8080/",
    "http://[::1]:3000/",
]


def test_a_policy_answers_a_url_it_has_seen_as_it_did_the_first_time() -> None:
    kept = TargetPolicy(["10.0.0.0/8", "127.0.0.0/8", "::1"], ["denied.test"], own_ports={3000})
    first = [kept.refusal_of_url(url) for url in URLS]
    again = [kept.refusal_of_url(url) for url in URLS * 3]
    fresh = TargetPolicy(["10.0.0.0/8", "127.0.0.0/8", "::1"], ["denied.test"], own_ports={3000})
    assert again == first * 3 == [fresh.refusal_of_url(url) for url in URLS] * 3
    assert "own port" in str(first[1]) and "own port" in str(first[7])
    assert first[2] is None and first[3] is None


def test_the_answers_a_policy_keeps_are_bounded() -> None:
    policy = TargetPolicy([], [], own_ports={3000})
    for n in range(targets.DECISIONS_KEPT * 2 + 10):
        assert policy.refusal_of_url(f"http://10.0.0.1/hook?n={n}") is None
    assert len(policy._decided) <= targets.DECISIONS_KEPT
    long = "http://10.0.0.1/" + "a" * targets.DECIDED_URL_LENGTH
    assert policy.refusal_of_url(long) is None and long not in policy._decided
    # Whether an address is this machine's own is asked again each time, not kept.
    assert "own port" in str(policy.refusal_of_url("http://127.0.0.1:3000/"))
    assert "http://127.0.0.1:3000/" not in policy._decided
