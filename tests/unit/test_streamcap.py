"""Concurrent stream caps: per key (429) and total (503), leases never leak or double-free."""

from __future__ import annotations

import pytest

from bridge.errors import ServiceUnavailable, TooManyRequests
from bridge.streamcap import StreamCaps


def test_per_user_cap_enforced() -> None:
    caps = StreamCaps(per_user=3, total=100)
    leases = [caps.acquire("user:a") for _ in range(3)]
    with pytest.raises(TooManyRequests) as info:
        caps.acquire("user:a")
    assert info.value.code == "TOO_MANY_STREAMS" and info.value.status == 429
    assert "Retry-After" in info.value.headers()
    assert caps.acquire("user:b").key == "user:b"  # others unaffected
    leases[0].release()
    caps.acquire("user:a")
    assert caps.open_for("user:a") == 3 and caps.open_total == 4


def test_total_cap_is_503_with_retry_after() -> None:
    caps = StreamCaps(per_user=3, total=2, retry_after_s=7)
    caps.acquire("a")
    caps.acquire("b")
    with pytest.raises(ServiceUnavailable) as info:
        caps.acquire("c")
    assert info.value.code == "OVERLOADED" and info.value.headers()["Retry-After"] == "7"


def test_per_user_refusal_comes_before_overload() -> None:
    caps = StreamCaps(per_user=1, total=1)
    caps.acquire("a")
    with pytest.raises(TooManyRequests):
        caps.acquire("a")


def test_hundred_cycles_with_double_release_leave_nothing_open() -> None:
    caps = StreamCaps(per_user=3, total=5)
    for i in range(100):
        key = f"user:{i % 4}"
        lease = caps.acquire(key)
        other = caps.acquire(key)
        lease.release()  # stream ended ...
        lease.release()  # ... and the disconnect handler releases too
        other.release()
        other.release()
        assert caps.open_total == 0
    assert caps.open_total == 0
    assert all(caps.open_for(f"user:{i}") == 0 for i in range(4))
    assert caps._by_key == {}  # no per-key residue


def test_double_release_cannot_free_someone_elses_slot() -> None:
    caps = StreamCaps(per_user=2, total=10)
    first = caps.acquire("a")
    caps.acquire("a")
    first.release()
    first.release()
    assert caps.open_for("a") == 1 and first.released


def test_invalid_caps_rejected() -> None:
    with pytest.raises(ValueError):
        StreamCaps(per_user=0, total=1)
