"""The collector settings a service takes once it has built what it keeps."""

from __future__ import annotations

import gc

import pytest

from keel.supervision import collector


@pytest.mark.usefixtures("settled_collector")
def test_settling_freezes_what_exists_and_spaces_young_collections() -> None:
    kept = [{"state": n} for n in range(1_000)]
    gc.unfreeze()

    collector.settle()

    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, *collector.OLDER_THRESHOLDS)


@pytest.mark.usefixtures("settled_collector")
def test_cyclic_garbage_made_after_settling_is_still_collected() -> None:
    collector.settle()

    class Node:
        partner: object = None

    first, second = Node(), Node()
    first.partner, second.partner = second, first
    del first, second

    assert gc.collect() >= 2
