"""Aggregate state owned by one processor worker, folded from its own events.

The processor's only state is the events it wrote: on partition assignment it loads the
partition's latest snapshot (``keel.processor.snapshots``) and folds the events after it
(``read_committed``) with the domain's ``evolve``, plus the parked approvals; with no
readable snapshot it folds the whole partition. No second store can drift from the log.
Changes made while a transaction is open live in a ``BatchView`` and reach the partition
state only after the commit.

The ids of decided commands are what makes a re-sent command a duplicate. They are kept
for a window (``KEEL_PROCESSOR_DEDUPE_WINDOW_S``, 30 days: longer than the outbox's 7, so
an id the gateway has forgotten is still caught here), not for ever: the set would
otherwise grow with every command the partition ever decided. A command created before
the window is refused (dead-lettered) instead of decided: its id may have been forgotten,
and deciding it again would repeat it, under the same event ids.
"""

from __future__ import annotations

import sys
import uuid
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from keel.domain.envelope import Envelope
from keel.domain.aggregate import EMPTY, AggregateState, evolve_aggregate

_BUCKET_S = 60  # ids expire a minute's worth at a time
ID_SIZE = 16  # a UUID, packed
_BUCKETS = 0xFFFF  # bucket = the id's hash & this: 65,536 buckets


def minutes_array(data: bytes = b"") -> array[int]:
    """An array of minutes (epoch seconds // 60) from its little-endian packed form."""
    minutes = array("I")
    assert minutes.itemsize == 4  # 'I' is 32 bits on every platform CPython supports
    minutes.frombytes(data)
    if sys.byteorder == "big":
        minutes.byteswap()
    return minutes


def packed_minutes(minutes: array[int]) -> bytes:
    """``minutes`` packed little-endian, the order ``minutes_array`` reads."""
    if sys.byteorder == "big":
        minutes = array("I", minutes)
        minutes.byteswap()
    return minutes.tobytes()


@dataclass
class IdJournal:
    """The ids added since the last checkpoint, packed: what the next snapshot adds."""

    ids: bytearray = field(default_factory=bytearray)
    minutes: array[int] = field(default_factory=lambda: array("I"))

    def __len__(self) -> int:
        return len(self.minutes)

    def drop(self, count: int) -> None:
        """Forget the first ``count`` ids (a checkpoint holding them committed)."""
        del self.ids[:count * ID_SIZE]
        del self.minutes[:count]


class DecidedIds:
    """Command ids decided on one partition in the last ``window_s`` seconds (0: all of them).

    Packed for memory (a Python ``set`` of ids costs 70-100 bytes each, 1 GB for 10 M): 20
    bytes an id, in up to 65,536 buckets chosen by the id's hash (seeded per process, so
    time-ordered ids such as UUIDv7, or chosen ones, still spread evenly). A bucket holds
    its ids as 16-byte records in one ``bytearray``, in the order they were added, and
    their minutes in a parallel ``array``; membership is a C-speed ``find`` over some
    hundreds of records, exact (no probabilistic filter: a false duplicate would drop a
    command). Expiring rewrites only the buckets whose oldest minute is past the window (an
    ``array`` ``min`` finds them): a minute's ids are spread over some hundreds of them, and
    a bucket's order does not matter (a restore interleaves the runs of a snapshot).
    """

    def __init__(self, window_s: float = 0.0, *, journal: bool = False) -> None:
        self.window_s = window_s
        self.journal = IdJournal() if journal else None
        """The ids added since the last checkpoint (None: no snapshots are written)."""
        self._ids: dict[int, bytearray] = {}
        self._minutes: dict[int, array[int]] = {}
        self._counts: deque[list[int]] = deque()  # [minute, ids decided in it], oldest first
        self._size = 0

    def __contains__(self, command_id: uuid.UUID) -> bool:
        packed = command_id.bytes
        ids = self._ids.get(hash(packed) & _BUCKETS)
        return ids is not None and _find(ids, packed) >= 0

    def __len__(self) -> int:
        return self._size

    def add(self, command_id: uuid.UUID, decided_at: float) -> None:
        """Remember ``command_id``, decided at ``decided_at`` (epoch seconds).

        A command's later events (after an approval) do not extend its window: an id
        expires once, a window after its first decision.
        """
        packed = command_id.bytes
        bucket = hash(packed) & _BUCKETS
        ids = self._ids.get(bucket)
        if ids is None:
            ids = self._ids[bucket] = bytearray()
            self._minutes[bucket] = array("I")
        elif _find(ids, packed) >= 0:
            return
        minute = self._file(int(decided_at // _BUCKET_S), 1)
        ids += packed
        self._minutes[bucket].append(minute)
        if self.journal is not None:
            self.journal.ids += packed
            self.journal.minutes.append(minute)

    def covers(self, created_at: float, now: float) -> bool:
        """Whether a command created at ``created_at`` is new enough for its id to be remembered if decided."""
        return not self.window_s or created_at >= now - self.window_s

    def expire(self, now: float) -> int:
        """Forget the ids decided more than ``window_s`` before ``now``; returns how many."""
        oldest_kept = self.oldest_kept(now)
        if oldest_kept is None or not self._counts or self._counts[0][0] >= oldest_kept:
            return 0
        forgotten = 0
        while self._counts and self._counts[0][0] < oldest_kept:
            forgotten += self._counts.popleft()[1]
        for bucket, minutes in list(self._minutes.items()):
            if min(minutes) >= oldest_kept:
                continue
            kept = [index for index, minute in enumerate(minutes) if minute >= oldest_kept]
            if not kept:
                del self._ids[bucket], self._minutes[bucket]
                continue
            ids = self._ids[bucket]
            self._ids[bucket] = bytearray().join(ids[i * ID_SIZE:(i + 1) * ID_SIZE] for i in kept)
            self._minutes[bucket] = array("I", (minutes[i] for i in kept))
        self._size -= forgotten
        return forgotten

    def oldest_kept(self, now: float) -> int | None:
        """The first minute whose ids are still remembered at ``now`` (None: every minute)."""
        return int((now - self.window_s) // _BUCKET_S) if self.window_s else None

    def packed(self) -> Iterator[tuple[bytes, array[int]]]:
        """Every id as ``(packed ids, their minutes)`` runs, a bucket at a time, each run oldest first."""
        for bucket, ids in self._ids.items():
            yield bytes(ids), self._minutes[bucket]

    def _file(self, minute: int, count: int) -> int:
        """Count ``count`` ids under ``minute`` (or the newest minute, if later); returns the minute used."""
        self._size += count
        if not self.window_s:
            return minute
        if self._counts and self._counts[-1][0] >= minute:  # the same minute, or a clock that stepped back
            self._counts[-1][1] += count
            return self._counts[-1][0]
        self._counts.append([minute, count])
        return minute


class IdsLoader:
    """Rebuilds ``DecidedIds`` from packed runs (``DecidedIds.packed``, then journals) in the order
    they were added, leaving out what expired at ``now``: a load adds each id record as it reads it."""

    def __init__(self, window_s: float, now: float) -> None:
        self._ids = DecidedIds(window_s)
        self._oldest_kept = self._ids.oldest_kept(now)
        self._counts: dict[int, int] = {}

    def add(self, ids: bytes, minutes: array[int]) -> None:
        """Add a run of packed ids and their minutes."""
        buckets, bucket_minutes, counts, oldest_kept = self._ids._ids, self._ids._minutes, self._counts, self._oldest_kept
        for index, minute in enumerate(minutes):
            if oldest_kept is not None and minute < oldest_kept:
                continue
            packed = ids[index * ID_SIZE:(index + 1) * ID_SIZE]
            bucket = hash(packed) & _BUCKETS
            found = buckets.get(bucket)
            if found is None:
                found = buckets[bucket] = bytearray()
                bucket_minutes[bucket] = array("I")
            found += packed
            bucket_minutes[bucket].append(minute)
            counts[minute] = counts.get(minute, 0) + 1

    def done(self, *, journal: bool = False) -> DecidedIds:
        """The ids added; ``journal``: it notes later additions for the next checkpoint."""
        ids = self._ids
        ids._size = sum(self._counts.values())
        if ids.window_s:
            ids._counts.extend([minute, self._counts[minute]] for minute in sorted(self._counts))
        if journal:
            ids.journal = IdJournal()
        return ids


def _find(ids: bytearray, packed: bytes) -> int:
    """The index of the record ``packed`` in ``ids`` (-1: absent); a match across two records is none."""
    at = ids.find(packed)
    while at > 0 and at % ID_SIZE:
        at = ids.find(packed, at + 1)
    return at


@dataclass
class PartitionState:
    """Every aggregate on one partition, and the command ids decided there within the window."""

    aggregates: dict[str, AggregateState] = field(default_factory=dict)
    decided: DecidedIds = field(default_factory=DecidedIds)
    changed: set[str] | None = None
    """The aggregates changed since the last checkpoint (None: no snapshots are written)."""

    @classmethod
    def keeping_ids_for(cls, window_s: float, *, tracking: bool = False) -> PartitionState:
        """An empty partition state that forgets decided ids after ``window_s`` (0: never).

        ``tracking``: note what changes (aggregates and ids) for the next checkpoint.
        """
        return cls(decided=DecidedIds(window_s, journal=tracking), changed=set() if tracking else None)

    def apply(self, events: Iterable[Envelope]) -> None:
        """Fold committed events into the state."""
        for event in events:
            self.aggregates[event.key] = evolve_aggregate(self.aggregates.get(event.key, EMPTY), event)
            if event.causation_id is not None:
                self.decided.add(event.causation_id, event.occurred_at.timestamp())
            if self.changed is not None:
                self.changed.add(event.key)


@dataclass
class BatchView:
    """Uncommitted changes of one transaction, layered over the partition states."""

    base: dict[int, PartitionState]
    aggregates: dict[tuple[int, str], AggregateState] = field(default_factory=dict)
    decided: dict[tuple[int, int], uuid.UUID] = field(default_factory=dict)
    """This batch's command ids by partition and the id's integer: a tuple holding a ``UUID``
    hashes through ``UUID.__hash__``, a Python call, and one holding an int does not."""

    def state(self, partition: int, key: str) -> AggregateState:
        """The aggregate's state including this batch's changes."""
        staged = self.aggregates.get((partition, key))
        if staged is not None:
            return staged
        return self.base[partition].aggregates.get(key, EMPTY)

    def already_decided(self, partition: int, command_id: uuid.UUID) -> bool:
        """True when the command was decided before (its events exist or are staged)."""
        return (partition, command_id.int) in self.decided or command_id in self.base[partition].decided

    def remembers_ids_from(self, partition: int, created_at: float, now: float) -> bool:
        """Whether a command created at ``created_at`` is inside the partition's dedupe window."""
        return self.base[partition].decided.covers(created_at, now)

    def dedupe_window_s(self, partition: int) -> float:
        """How long the partition remembers decided command ids (0: for ever)."""
        return self.base[partition].decided.window_s

    def record(self, partition: int, command_id: uuid.UUID, events: Iterable[Envelope]) -> None:
        """Stage the command's events."""
        for event in events:
            key = event.key  # a property that formats the key: once, not twice
            self.aggregates[(partition, key)] = evolve_aggregate(self.state(partition, key), event)
        self.decided[(partition, command_id.int)] = command_id

    def commit(self, decided_at: float) -> None:
        """Make the staged changes part of the partition states (after the Kafka commit).

        ``decided_at`` is the batch's decision time: its ids are remembered from then, and
        ids decided a window before it are forgotten.
        """
        for (partition, key), state in self.aggregates.items():
            base = self.base.get(partition)
            if base is not None:
                base.aggregates[key] = state
                if base.changed is not None:
                    base.changed.add(key)
        for (partition, _), command_id in self.decided.items():
            if partition in self.base:
                self.base[partition].decided.add(command_id, decided_at)
        for partition_state in self.base.values():
            partition_state.decided.expire(decided_at)
