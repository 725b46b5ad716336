"""Sticky rollout: stable buckets, monotone in the percentage, roughly the right share."""

from __future__ import annotations

from bridge.gate import BUCKETS, bucket, in_rollout

KEYS = [f"user:{i}" for i in range(20_000)]


def test_bounds() -> None:
    assert all(in_rollout(k, 100) for k in KEYS[:100])
    assert not any(in_rollout(k, 0) for k in KEYS[:100])


def test_raising_percentage_keeps_everyone_already_in() -> None:
    at5 = {k for k in KEYS if in_rollout(k, 5)}
    at25 = {k for k in KEYS if in_rollout(k, 25)}
    assert at5 <= at25
    assert 0.04 < len(at5) / len(KEYS) < 0.06
    assert 0.23 < len(at25) / len(KEYS) < 0.27


def test_stable_known_value() -> None:
    # sha256 is stable across processes (unlike hash()); pin one value so a refactor cannot reshuffle users
    assert bucket("user:42") == bucket("user:42")
    assert 0 <= bucket("user:42") < BUCKETS
    assert bucket("user:42") == PINNED


def test_salt_separates_rollouts() -> None:
    same = sum(in_rollout(k, 10, salt="a") == in_rollout(k, 10, salt="b") for k in KEYS)
    assert same < len(KEYS)


def test_fractional_percent() -> None:
    share = sum(in_rollout(k, 0.5) for k in KEYS) / len(KEYS)
    assert 0.002 < share < 0.008


PINNED = 9978  # sha256("sse:user:42")[:8] mod 10000
