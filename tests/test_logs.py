"""Unit tests of worker/logs.py: masking whole secrets only, and the per-address throttle."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from worker.logs import MASK, Masker, Throttle


def test_a_one_letter_key_leaves_words_that_contain_the_letter_alone() -> None:
    mask = Masker(["k"])
    for line in ("task_id=3", "load balancer websocket listening", "kk", "key=kind"):
        assert mask(line) == line
    assert mask("key k here") == f"key {MASK} here"
    assert mask('{"auth": "k"}') == f'{{"auth": "{MASK}"}}'


def test_the_whole_key_is_masked_where_it_stands_alone() -> None:
    key = "s3cret-key-0123456789"
    mask = Masker([key])
    assert mask(f"Bearer {key}") == f"Bearer {MASK}"
    assert mask(f"key={key}, next") == f"key={MASK}, next"
    assert mask(f"[{key}]") == f"[{MASK}]"
    # Part of a longer token is another value: it is not the key, and it is left whole.
    assert mask(f"x{key}") == f"x{key}"


def test_a_key_inside_a_json_escaped_string_is_masked() -> None:
    key = 'we"ird\\key-0123456789'
    mask = Masker([key])
    once = json.dumps({"Token": key})
    twice = json.dumps({"log": once})
    assert key not in mask(once) and json.dumps(key)[1:-1] not in mask(once)
    assert MASK in mask(once)
    assert MASK in mask(twice) and json.dumps(json.dumps(key)[1:-1])[1:-1] not in mask(twice)


def test_authorization_values_are_masked_in_any_quoting() -> None:
    mask = Masker([])
    assert mask("Authorization: Bearer abc") == f"Authorization: Bearer {MASK}"
    assert mask("{'x-lb-auth': 'abc'}") == f"{{'x-lb-auth': '{MASK}'}}"
    escaped = '{\\"Authorization\\": \\"Bearer sometoken\\"}'
    assert "sometoken" not in mask(escaped)


@given(
    key=st.text(alphabet="abcdefghijk0123456789-_", min_size=1, max_size=20),
    text=st.text(alphabet="abcdefghijk0123456789 _-=:.,", max_size=80),
)
def test_masking_only_ever_replaces_the_key_itself(key: str, text: str) -> None:
    """What is masked, put back, gives the line again: nothing else was touched."""
    masked = Masker([key])(text)
    assert masked.replace(MASK, key) == text or MASK in text


def test_the_throttle_allows_a_line_a_second_per_key_and_counts_the_rest() -> None:
    now = [100.0]
    throttle = Throttle(every=1.0, keys=2, clock=lambda: now[0])
    assert throttle.allow("a") == 0
    assert [throttle.allow("a") for _ in range(5)] == [None] * 5
    assert throttle.allow("b") == 0  # another address has its own budget
    now[0] += 1.0
    assert throttle.allow("a") == 5
    assert throttle.allow("c") == 0  # a third key evicts the oldest one
    assert throttle.allow("b") == 0  # b was forgotten, so nothing is suppressed
