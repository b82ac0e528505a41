"""Checkpoints of a processor's partition state, so that a worker's start-up stays bounded.

A worker's state is the fold of its events partition; folding it all on each assignment
takes longer every day. So the state goes, in checkpoints, to the compacted snapshots topic
(one partition per events partition), in the same transaction as a batch's events:

- one record per aggregate, keyed ``a/<tenant>/<aggregate>``, rewritten when the aggregate
  changed since the previous checkpoint (compaction keeps the latest);
- the ids decided since the previous checkpoint, packed, keyed ``i/<generation>/<seq>``; a
  record is deleted (tombstone) once all its ids are past the dedupe window;
- last, the manifest ``m``: the events offset the checkpoint covers, and the counts a load
  checks.

Which offset a checkpoint covers: it is built, before the commit of transaction T+1, from
the state every committed transaction up to T made; the offsets of T's events are known
from their delivery reports, all served before T's commit returned. So it covers the
events below (last event offset of the partition, committed by T or earlier) + 1, or the
end a load read to. T+1's own events lie above, and T+1 commits them with the checkpoint
or neither: a load folds exactly the events after the state it read, none twice.

A generation names a consistent set of records: after a full fold (no readable snapshot)
the next checkpoint writes every aggregate and id under a new one and deletes every other
key it saw. A checkpoint is due after ``KEEL_PROCESSOR_SNAPSHOT_EVENTS`` events of a
partition, or ``KEEL_PROCESSOR_SNAPSHOT_INTERVAL_S`` after the previous one if anything
changed; the first after a full fold at once, unless the fold found nothing to save or delete
(a partition that starts empty counts from its start like any other). Snapshots hold domain
state as ``evolve`` left it; keep personal plaintext out of aggregate state (it belongs in
the sealed events).
"""

from __future__ import annotations

import logging
import os
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from keel.processor.snapshot_format import (
    GENERATION_AT,
    IDS_PER_RECORD,
    Manifest,
    SnapshotError,
    SnapshotFormat,
    part_key,
)
from keel.processor.state import ID_SIZE, IdJournal, IdsLoader, PartitionState

log = logging.getLogger(__name__)

MANIFEST_KEY = b"m"
_AGGREGATE = b"a/"
_IDS = b"i/"


@dataclass
class Track:
    """What the writer knows of one partition's snapshot."""

    generation: bytes
    covered: int
    """The events offset the partition's state runs up to (all committed events below it are folded)."""
    checkpointed: int = -1
    """The offset the latest committed checkpoint covers (-1: none of this generation yet)."""
    checkpoint_time: float = 0.0
    next_seq: int = 0
    id_records: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    """Live id record key -> (its newest minute, how many ids)."""
    parts: dict[bytes, int] = field(default_factory=dict)
    """Aggregate keys written in more than one part -> how many."""
    stale: set[bytes] = field(default_factory=set)
    """Keys seen at load that the first checkpoint of a new generation deletes."""
    unsaved_fold: bool = False
    """The load folded events that no checkpoint holds: the first checkpoint is due at once."""

    @classmethod
    def fresh(cls, covered: int, stale: set[bytes]) -> Track:
        """A new generation; its first checkpoint is due at once if there is anything to save or
        delete, else (an empty partition) after as many events or as long as any other."""
        return cls(generation=os.urandom(8), covered=covered, stale=stale, checkpoint_time=time.monotonic())


@dataclass
class _Plan:
    """What a checkpoint in the open transaction will have made true once it commits."""

    partition: int
    track: Track
    journaled: int
    id_records: dict[bytes, tuple[int, int]]
    parts: dict[bytes, int]
    next_seq: int


class Checkpoints:
    """Writes checkpoints into the processor's transactions and loads them on assignment."""

    def __init__(self, snapshot_format: SnapshotFormat, topic: str, events_topic: str, *, every_events: int,
                 interval_s: float) -> None:
        self.format = snapshot_format
        self.topic = topic
        self.events_topic = events_topic
        self.every_events = every_events
        if every_events:
            try:
                _ = snapshot_format.fingerprint
            except SnapshotError as exc:
                log.warning("no snapshots are written, every start-up folds whole partitions: %s", exc)
                self.every_events = 0
        self.interval_s = interval_s
        self.tracks: dict[int, Track] = {}
        self._delivered: dict[int, int] = {}  # partition -> offset after its last event produced since the commit
        self._plans: list[_Plan] = []

    @property
    def enabled(self) -> bool:
        return self.every_events > 0

    # -- writing ------------------------------------------------------------------------

    def delivered(self, error: KafkaError | None, message: Message) -> None:
        """The producer's delivery report: notes how far each events partition got."""
        if error is None and message.topic() == self.events_topic:
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None  # a delivered record has a position
            if offset >= self._delivered.get(partition, 0):
                self._delivered[partition] = offset + 1

    def add_to(self, producer: Producer, states: dict[int, PartitionState], now: float) -> int:
        """Produce the checkpoints due into the open transaction; returns how many records.

        ``states`` are the partition states as the last commit left them (this batch's
        changes are not in them yet), ``now`` the decision time.
        """
        self._plans = []
        if not self.enabled:
            return 0
        produced = 0
        clock = time.monotonic()
        for partition, state in states.items():
            track = self.tracks.get(partition)
            if track is None or not self._due(track, clock):
                continue
            for key, value in self._checkpoint(partition, state, track, now):
                _produce(producer, self.topic, key, value, partition)
                produced += 1
        return produced

    def committed(self, states: dict[int, PartitionState]) -> None:
        """After the commit: the checkpoints in it stand, and the batch's events are covered."""
        clock = time.monotonic()
        for plan in self._plans:
            track, state = plan.track, states.get(plan.partition)
            if state is None or self.tracks.get(plan.partition) is not track:
                continue
            track.checkpointed, track.checkpoint_time = track.covered, clock
            track.id_records, track.parts, track.next_seq = plan.id_records, plan.parts, plan.next_seq
            track.stale = set()
            if state.changed is not None:
                state.changed.clear()
            if state.decided.journal is not None:
                state.decided.journal.drop(plan.journaled)
        self._plans = []
        for partition, offset in self._delivered.items():
            owned = self.tracks.get(partition)
            if owned is not None and offset > owned.covered:
                owned.covered = offset
        self._delivered.clear()

    def _due(self, track: Track, clock: float) -> bool:
        if track.checkpointed < 0 and (track.unsaved_fold or track.stale):
            return True
        moved = track.covered - max(track.checkpointed, 0)
        return moved >= self.every_events or (moved > 0 and clock - track.checkpoint_time >= self.interval_s)

    def _checkpoint(self, partition: int, state: PartitionState, track: Track,
                    now: float) -> Iterator[tuple[bytes, bytes | None]]:
        """The records of one checkpoint of ``state``, manifest last; notes its plan."""
        full = track.checkpointed < 0
        gen = track.generation
        parts = dict(track.parts)
        written: set[bytes] = set()
        keys = state.aggregates.keys() if full else (state.changed or set())
        for name in keys:
            key = _AGGREGATE + name.encode()
            records = self.format.records(key, self.format.encode_aggregate(state.aggregates[name]), gen)
            yield from records
            written.update(k for k, _ in records)
            for index in range(len(records), parts.get(key, 1)):
                yield part_key(key, index), None
            if len(records) > 1:
                parts[key] = len(records)
            else:
                parts.pop(key, None)
        journal = state.decided.journal
        journaled = len(journal) if journal is not None else 0
        id_records = {} if full else dict(track.id_records)
        seq = track.next_seq
        runs = state.decided.packed() if full else _journal_runs(journal)
        for ids, minutes in _chunks(runs):
            key = _IDS + gen.hex().encode() + b"/" + str(seq).encode()
            seq += 1
            yield from self.format.records(key, self.format.encode_ids(ids, minutes), gen)
            written.add(key)
            id_records[key] = (max(minutes), len(minutes))
        oldest_kept = state.decided.oldest_kept(now)
        for key, (newest, _) in list(id_records.items()):
            if oldest_kept is not None and newest < oldest_kept:
                del id_records[key]
                yield key, None
        for key in track.stale - written:
            yield key, None
        manifest = Manifest(covered=track.covered, aggregates=len(state.aggregates),
                            ids=sum(count for _, count in id_records.values()), id_records=len(id_records),
                            next_seq=seq, window_s=state.decided.window_s)
        yield from self.format.records(MANIFEST_KEY, self.format.encode_manifest(manifest), gen)
        self._plans.append(_Plan(partition, track, journaled, id_records, parts, seq))

    # -- loading ------------------------------------------------------------------------

    def load(self, consumer: Consumer, partitions: list[int], window_s: float, now: float,
             step: Callable[[], None]) -> dict[int, tuple[PartitionState, int]]:
        """Each partition's state from its snapshot and the events offset to fold from.

        A partition without a readable snapshot starts empty from offset 0 (a full fold),
        with a warning saying why; its next checkpoint starts a new generation.
        """
        reads = self._read(consumer, partitions, window_s, now, step)
        loaded: dict[int, tuple[PartitionState, int]] = {}
        for partition in partitions:
            read = reads[partition]
            try:
                state, track = self.restore(read, window_s, now, step)
                low, high = consumer.get_watermark_offsets(TopicPartition(self.events_topic, partition), 30)
                if not low <= track.covered <= high:
                    raise SnapshotError(f"it covers events up to offset {track.covered}, the events partition "
                                        f"holds offsets {low} to {high}")
            except SnapshotError as exc:
                if read.records or read.id_keys:
                    log.warning("snapshot of %s[%d] skipped, folding the whole partition: %s",
                                self.topic, partition, exc)
                state = PartitionState.keeping_ids_for(window_s)  # the first checkpoint writes it all
                live = {key for key, value in read.records.items() if value is not None}
                track = Track.fresh(0, live | read.id_keys)
            else:
                log.info("%s[%d]: %d aggregates and %d ids from the snapshot, folding events from offset %d on",
                         self.topic, partition, len(state.aggregates), len(state.decided), track.covered)
            self.tracks[partition] = track
            loaded[partition] = state, track.covered
        return loaded

    def folded(self, partition: int, state: PartitionState, end: int) -> None:
        """The load folded ``partition``'s events up to ``end`` (its end of partition) into ``state``.

        From now on the state notes its changes for the next checkpoint (a full fold did not:
        the first checkpoint after it writes everything).
        """
        track = self.tracks[partition]
        track.covered = max(track.covered, end)
        track.unsaved_fold = track.unsaved_fold or (track.checkpointed < 0 and end > 0)
        if self.enabled and state.changed is None:
            state.changed = set()
            state.decided.journal = IdJournal()

    def _read(self, consumer: Consumer, partitions: list[int], window_s: float, now: float,
              step: Callable[[], None]) -> dict[int, SnapshotRead]:
        """Every snapshot partition read to its end."""
        reads = {p: SnapshotRead(self.format, window_s, now) for p in partitions}
        if not self.enabled:
            return reads
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        pending = set(partitions)
        while pending:
            step()
            for message in consumer.consume(10_000, timeout=0.1):
                error, partition = message.error(), message.partition()
                assert partition is not None  # every record and end of partition has one
                if error is None:
                    reads[partition].add(message.key() or b"", message.value())
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(partition)
                else:
                    raise KafkaException(error)
        consumer.unassign()
        return reads

    def restore(self, read: SnapshotRead, window_s: float, now: float,
                step: Callable[[], None]) -> tuple[PartitionState, Track]:
        """The state a partition's snapshot holds; raises ``SnapshotError`` when its records do not add up."""
        records = read.records
        head, payload = self.format.payload(MANIFEST_KEY, records)
        manifest = self.format.decode_manifest(payload)
        if manifest.window_s and (not window_s or manifest.window_s < window_s):
            raise SnapshotError(f"it kept ids for {manifest.window_s:.0f} s, the dedupe window is now {window_s:.0f} s")
        gen = head.generation
        if gen in read.errors:
            raise read.errors[gen]
        state = PartitionState.keeping_ids_for(window_s, tracking=True)
        track = Track(generation=gen, covered=manifest.covered, checkpointed=manifest.covered,
                      checkpoint_time=time.monotonic(), next_seq=manifest.next_seq,
                      id_records=read.id_records.get(gen, {}), stale=read.id_keys - set(read.id_records.get(gen, {})))
        for index, (key, value) in enumerate(records.items()):
            if not index % 10_000:
                step()
            if value is None or b"#" in key:
                continue
            if key.startswith(_AGGREGATE):
                aggregate_head, payload = self.format.payload(key, records)
                if aggregate_head.generation != gen:
                    raise SnapshotError(f"aggregate record {key!r} is of another generation")
                state.aggregates[key[len(_AGGREGATE):].decode()] = self.format.decode_aggregate(payload)
                if aggregate_head.parts > 1:
                    track.parts[key] = aggregate_head.parts
            elif key != MANIFEST_KEY:
                track.stale.add(key)
        ids_total = sum(count for _, count in track.id_records.values())
        if (len(state.aggregates), len(track.id_records), ids_total) != (
                manifest.aggregates, manifest.id_records, manifest.ids):
            raise SnapshotError(
                f"the snapshot holds {len(state.aggregates)} aggregates and {ids_total} ids in "
                f"{len(track.id_records)} records, its manifest says {manifest.aggregates}, {manifest.ids} "
                f"and {manifest.id_records}")
        loader = read.ids.get(gen)
        state.decided = (loader or IdsLoader(window_s, now)).done(journal=True)
        return state, track


class SnapshotRead:
    """One snapshot partition as a load reads it: the latest value of each key, but id records,
    which are added to their generation's ids as they come (never held twice in memory)."""

    def __init__(self, snapshot_format: SnapshotFormat, window_s: float, now: float) -> None:
        self.format = snapshot_format
        self.window_s, self.now = window_s, now
        self.records: dict[bytes, bytes | None] = {}
        """Every key but the id records' -> its latest value (None: deleted)."""
        self.ids: dict[bytes, IdsLoader] = {}
        """Generation -> the ids of its records read so far."""
        self.id_records: dict[bytes, dict[bytes, tuple[int, int]]] = {}
        """Generation -> its live id record keys -> (newest minute, how many ids)."""
        self.errors: dict[bytes, SnapshotError] = {}
        """Generation -> why one of its id records cannot be read."""
        self.id_keys: set[bytes] = set()
        """Every live id record key, of any generation."""

    def add(self, key: bytes, value: bytes | None) -> None:
        """One record, in log order."""
        if not key.startswith(_IDS):
            self.records[key] = value
            if key == MANIFEST_KEY and value is not None:
                self._keep_only(value[GENERATION_AT:GENERATION_AT + 8])
            return
        if value is None:
            self.id_keys.discard(key)
            for records in self.id_records.values():
                records.pop(key, None)
            return
        self.id_keys.add(key)
        try:
            gen = bytes.fromhex(key.split(b"/")[1].decode())
        except (IndexError, ValueError):
            return  # no key this format writes: a new generation deletes it
        if gen in self.errors:
            return
        try:
            head, payload = self.format.payload(key, {key: value})
            if head.generation != gen or head.parts != 1:
                raise SnapshotError(f"id record {key!r} does not match its key")
            ids, minutes = self.format.decode_ids(payload)
        except SnapshotError as exc:
            self.errors[gen] = exc
            return
        self.ids.setdefault(gen, IdsLoader(self.window_s, self.now)).add(ids, minutes)
        self.id_records.setdefault(gen, {})[key] = (max(minutes, default=0), len(minutes))

    def _keep_only(self, gen: bytes) -> None:
        """A manifest of ``gen``: the ids of other generations (written before it) can go."""
        for kept in (self.ids, self.id_records, self.errors):
            for other in [g for g in kept if g != gen]:
                del kept[other]


def _journal_runs(journal: IdJournal | None) -> Iterator[tuple[bytes, array[int]]]:
    if journal is not None and len(journal):
        yield bytes(journal.ids), array("I", journal.minutes)


def _produce(producer: Producer, topic: str, key: bytes, value: bytes | None, partition: int) -> None:
    """Produce one record, waiting for room when a large checkpoint fills the producer's queue."""
    while True:
        try:
            producer.produce(topic, value, key, partition=partition)
            return
        except BufferError:
            producer.poll(0.05)


def _chunks(runs: Iterator[tuple[bytes, array[int]]]) -> Iterator[tuple[bytes, array[int]]]:
    """``runs`` regrouped into id records of at most ``IDS_PER_RECORD`` ids, order kept."""
    ids, minutes = bytearray(), array("I")
    for run_ids, run_minutes in runs:
        at = 0
        while at < len(run_minutes):
            take = min(IDS_PER_RECORD - len(minutes), len(run_minutes) - at)
            ids += run_ids[at * ID_SIZE:(at + take) * ID_SIZE]
            minutes.extend(run_minutes[at:at + take])
            at += take
            if len(minutes) == IDS_PER_RECORD:
                yield bytes(ids), minutes
                ids, minutes = bytearray(), array("I")
    if minutes:
        yield bytes(ids), minutes
