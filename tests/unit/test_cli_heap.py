"""``freeze_startup_heap``: what the process holds once it serves is exempt from later collections,
and startup's garbage is freed first, never kept for the whole run."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from bridge.cli import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.peer: Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_startup_garbage_is_collected_before_the_freeze(unfrozen: None) -> None:
    a, b = Node(), Node()
    a.peer, b.peer = b, a  # a cycle: only the collector frees it
    gone = weakref.ref(a)
    del a, b
    freeze_startup_heap()
    assert gone() is None


def test_objects_alive_at_the_freeze_are_not_traversed_by_later_collections(unfrozen: None) -> None:
    kept = [Node() for _ in range(1000)]
    freeze_startup_heap()
    assert gc.get_freeze_count() >= len(kept)
    assert not any(gc.is_tracked(node) and node in gc.get_objects() for node in kept[:3])
