"""``freeze_startup_heap``: start-up garbage is collected, and what is alive is kept out of later passes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from rbees.heap import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()  # leave the test process's collector as it was


def test_garbage_is_collected_and_the_live_heap_is_frozen(unfrozen: None) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the cyclic collector can free it
    dead = weakref.ref(a)
    del a, b
    kept = Node()
    frozen = freeze_startup_heap()
    assert dead() is None
    assert frozen > 0 and gc.get_freeze_count() > 0  # (frozen objects that die leave the count)
    # Live objects are out of the collector's generations: a full pass no longer walks them.
    assert not any(obj is kept for obj in gc.get_objects())
    assert gc.is_tracked(kept)
