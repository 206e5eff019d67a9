"""The daemon's garbage-collector settings (kmsfs.fs.daemon.settle_garbage_collector).

Serving freezes what start-up built and collects cycles less often; it must never stop
collecting them, or a long-lived mount would keep every cycle a request ever made.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from kmsfs.fs import daemon


@pytest.fixture
def settled() -> Iterator[None]:
    threshold = gc.get_threshold()
    daemon.settle_garbage_collector()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    me: object


def test_start_up_objects_are_frozen_and_the_collector_stays_on(settled: None) -> None:
    assert gc.isenabled()
    assert gc.get_freeze_count() > 1000  # this test's own modules among them
    assert gc.get_threshold()[0] >= daemon.GC_YOUNG_THRESHOLD


def test_cycles_made_while_serving_are_still_collected(settled: None) -> None:
    cycle = _Node()
    cycle.me = cycle
    gone = weakref.ref(cycle)
    del cycle
    assert gone() is not None  # reference counting alone cannot free it
    allocated = [[] for _ in range(100_000)]  # a young collection must come within these
    assert gone() is None
    del allocated
