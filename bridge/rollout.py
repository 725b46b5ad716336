"""Sticky percentage rollout.

A key is hashed (SHA-256, stable across processes and restarts, unlike ``hash()``) into one of
10 000 buckets and is in the rollout when its bucket is below ``percent * 100``. Raising the
percentage only adds buckets, so users already streaming at 5% keep streaming at 25%, and a user
does not flip between streaming and non-streaming from one request or instance to the next.
"""

from __future__ import annotations

import hashlib

BUCKETS = 10_000


def bucket(key: str, salt: str = "sse") -> int:
    """The key's bucket in ``0..BUCKETS-1``; ``salt`` keeps separate rollouts independent."""
    digest = hashlib.sha256(f"{salt}:{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_rollout(key: str, percent: float, salt: str = "sse") -> bool:
    """Whether ``key`` is inside a rollout of ``percent`` (0..100) per cent."""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    return bucket(key, salt) < round(percent * BUCKETS / 100)
