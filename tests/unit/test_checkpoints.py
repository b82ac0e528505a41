"""The checkpoint writer's bookkeeping: what a checkpoint holds, which offset it covers, what an abort keeps."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest

from keel.contracts.codec import EnvelopeCodec
from keel.domain.aggregate import AggregateState
from keel.domains.registry import current
from keel.processor.snapshot_format import SnapshotFormat
from keel.processor.snapshots import MANIFEST_KEY, Checkpoints, SnapshotRead, Track
from keel.processor.state import PartitionState

EVENTS = "t.events"
T0 = 1_800_000_000.0
DAY = 24 * 3600.0


@dataclass
class Delivered:
    """A delivery report's message."""

    at: int
    where: str = EVENTS

    def topic(self) -> str:
        return self.where

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.at


@dataclass
class Transaction:
    """Stands in for the producer: what one transaction received."""

    records: dict[bytes, bytes | None] = field(default_factory=dict)

    def produce(self, topic: str, value: bytes | None, key: bytes, partition: int) -> None:
        assert (topic, partition) == ("t.snapshots", 0)
        self.records[key] = value


@pytest.fixture
def checkpoints() -> Checkpoints:
    return Checkpoints(SnapshotFormat(current(), EnvelopeCodec()), "t.snapshots", EVENTS, every_events=10,
                       interval_s=60)


def tracked(checkpoints: Checkpoints, covered: int) -> PartitionState:
    """A partition folded up to ``covered`` without a snapshot: its next checkpoint writes it all."""
    state = PartitionState.keeping_ids_for(DAY)
    checkpoints.tracks[0] = Track.fresh(0, set())
    checkpoints.folded(0, state, covered)
    return state


def change(state: PartitionState, key: str, version: int) -> uuid.UUID:
    command_id = uuid.uuid4()
    state.aggregates[key] = AggregateState(version=version)
    assert state.changed is not None
    state.changed.add(key)
    state.decided.add(command_id, T0)
    return command_id


def checkpoint(checkpoints: Checkpoints, state: PartitionState, *, commit: bool = True,
               delivered: tuple[int, ...] = ()) -> dict[bytes, bytes | None]:
    """One transaction: its checkpoint (if due), the events it delivered, and its commit (or abort)."""
    transaction = Transaction()
    checkpoints.add_to(transaction, {0: state}, T0)  # type: ignore[arg-type]
    for offset in delivered:
        checkpoints.delivered(None, Delivered(offset))  # type: ignore[arg-type]
    if commit:
        checkpoints.committed({0: state})
    return transaction.records


def read_all(*transactions: dict[bytes, bytes | None]) -> SnapshotRead:
    """The snapshot partition after ``transactions``, as a load reads it."""
    read = SnapshotRead(SnapshotFormat(current(), EnvelopeCodec()), DAY, T0)
    for records in transactions:
        for key, value in records.items():
            read.add(key, value)
    return read


def restored(checkpoints: Checkpoints, *transactions: dict[bytes, bytes | None]) -> tuple[PartitionState, int]:
    state, track = checkpoints.restore(read_all(*transactions), DAY, T0, lambda: None)
    return state, track.covered


def test_a_checkpoint_covers_what_committed_before_its_transaction_and_not_its_own_events(
        checkpoints: Checkpoints) -> None:
    state = tracked(checkpoints, covered=5)
    first = change(state, "acme/a", 1)

    full = checkpoint(checkpoints, state, delivered=(5, 6, 20))  # the first checkpoint, in the batch of 5..20
    change(state, "acme/b", 1)
    second = checkpoint(checkpoints, state, delivered=(22,))

    assert restored(checkpoints, full)[1] == 5
    loaded, covered = restored(checkpoints, full, second)
    assert covered == 21  # its own event 22 is after it (offset 21 was the commit marker after event 20)
    assert set(loaded.aggregates) == {"acme/a", "acme/b"} and first in loaded.decided and len(loaded.decided) == 2


def test_an_aborted_checkpoint_is_written_again_whole_by_the_next(checkpoints: Checkpoints) -> None:
    state = tracked(checkpoints, covered=3)
    full = checkpoint(checkpoints, state)
    for offset in range(3, 20):
        checkpoints.delivered(None, Delivered(offset))  # type: ignore[arg-type]
    checkpoints.committed({0: state})
    decided = change(state, "acme/a", 1)

    aborted = checkpoint(checkpoints, state, commit=False)
    retried = checkpoint(checkpoints, state)

    assert aborted.keys() == retried.keys() and b"a/acme/a" in retried
    loaded, covered = restored(checkpoints, full, retried)
    assert covered == 20 and decided in loaded.decided


def test_a_checkpoint_is_due_after_enough_events_or_time_and_only_if_something_changed(
        checkpoints: Checkpoints) -> None:
    state = tracked(checkpoints, covered=1)
    assert MANIFEST_KEY in checkpoint(checkpoints, state, delivered=(1, 2, 3))
    assert not checkpoint(checkpoints, state, delivered=(19,))  # 3 events since the last one: not yet
    assert MANIFEST_KEY in checkpoint(checkpoints, state)  # 19 since: due

    checkpoints.tracks[0].checkpoint_time -= 61
    assert not checkpoint(checkpoints, state, delivered=(20,))  # late enough, but nothing since
    assert MANIFEST_KEY in checkpoint(checkpoints, state)  # 1 event since, late enough
    checkpoints.tracks[0].checkpoint_time -= 61
    assert not checkpoint(checkpoints, state)


def test_a_partition_that_starts_empty_checkpoints_after_enough_events_or_time(
        checkpoints: Checkpoints) -> None:
    state = tracked(checkpoints, covered=0)  # nothing folded, nothing to delete
    change(state, "acme/a", 1)
    assert not checkpoint(checkpoints, state, delivered=(0, 1, 2))  # its own first events: not yet
    assert not checkpoint(checkpoints, state, delivered=(9,))  # 3 events
    assert MANIFEST_KEY in checkpoint(checkpoints, state)  # 10 events: due
    assert checkpoints.tracks[0].checkpointed == 10

    later = tracked(checkpoints, covered=0)
    change(later, "acme/b", 1)
    assert not checkpoint(checkpoints, later, delivered=(0,))
    checkpoints.tracks[0].checkpoint_time -= 61
    written = checkpoint(checkpoints, later)  # 1 event, but late enough
    assert MANIFEST_KEY in written and b"a/acme/b" in written


def test_id_records_past_the_dedupe_window_are_deleted(checkpoints: Checkpoints) -> None:
    state = tracked(checkpoints, covered=1)
    change(state, "acme/a", 1)
    full = checkpoint(checkpoints, state)
    [ids_key] = [key for key in full if key.startswith(b"i/")]

    checkpoints.delivered(None, Delivered(30))  # type: ignore[arg-type]
    checkpoints.committed({0: state})
    transaction = Transaction()
    checkpoints.add_to(transaction, {0: state}, T0 + DAY + 120)  # type: ignore[arg-type]

    assert transaction.records[ids_key] is None


def test_an_unreadable_record_of_an_earlier_generation_spoils_nothing(checkpoints: Checkpoints) -> None:
    state = tracked(checkpoints, covered=1)
    decided = change(state, "acme/a", 1)
    earlier = b"i/" + bytes(8).hex().encode() + b"/0"  # say, written by other domain code

    loaded, track = checkpoints.restore(read_all({earlier: b"KS\x01 not of this code"}, checkpoint(checkpoints, state)),
                                        DAY, T0, lambda: None)

    assert track.covered == 1 and decided in loaded.decided
    assert earlier in track.stale  # the next checkpoint deletes it
