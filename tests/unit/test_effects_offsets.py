"""The commit point: the lowest record whose effect has no recorded outcome, else the next record."""

from __future__ import annotations

from keel.effects.offsets import PartitionOffsets


def test_the_commit_point_stays_at_the_lowest_unsettled_effect() -> None:
    offsets = PartitionOffsets()
    assert offsets.commit_point() is None
    for offset in range(10, 16):
        offsets.read(offset)
    assert offsets.commit_point() == 16  # nothing held: everything read is settled
    offsets.hold(11)
    offsets.hold(13)
    offsets.hold(14)
    offsets.read(16)
    assert offsets.commit_point() == 11
    offsets.release(13)  # settled out of order: the point does not move past 11
    assert offsets.commit_point() == 11
    offsets.release(11)
    assert offsets.commit_point() == 14
    offsets.release(14)
    assert offsets.commit_point() == 17
