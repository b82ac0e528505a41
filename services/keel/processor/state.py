"""Aggregate state owned by one processor worker, folded from its own events.

The processor's only state is the events it wrote: on partition assignment it reads its
partition of the events topic (``read_committed``) and folds it with the domain's
``evolve`` (plus the parked approvals). No second store can drift from the log. Changes made while a transaction is
open live in a ``BatchView`` and reach the partition state only after the commit.

The ids of decided commands are what makes a re-sent command a duplicate. They are kept
for a window (``KEEL_PROCESSOR_DEDUPE_WINDOW_S``, 30 days: longer than the outbox's 7, so
an id the gateway has forgotten is still caught here), not for ever: the set would
otherwise grow with every command the partition ever decided. Each id costs about 100
bytes. A command created before the window is refused (dead-lettered) instead of
decided: its id may have been forgotten, and deciding it again would repeat it, under
the same event ids.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from keel.domain.envelope import Envelope
from keel.domain.aggregate import EMPTY, AggregateState, evolve_aggregate

_BUCKET_S = 60  # ids expire a minute's worth at a time


@dataclass
class DecidedIds:
    """Command ids decided on one partition in the last ``window_s`` seconds (0: all of them)."""

    window_s: float = 0.0
    _ids: set[int] = field(default_factory=set)  # UUID.int: half the memory of UUID objects
    # (minute, ids decided in it), oldest first: what expires next is at the left
    _minutes: deque[tuple[int, list[int]]] = field(default_factory=deque)

    def __contains__(self, command_id: uuid.UUID) -> bool:
        return command_id.int in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, command_id: uuid.UUID, decided_at: float) -> None:
        """Remember ``command_id``, decided at ``decided_at`` (epoch seconds).

        A command's later events (after an approval) do not extend its window: an id
        expires once, a window after its first decision.
        """
        number = command_id.int
        if number in self._ids:
            return
        self._ids.add(number)
        if not self.window_s:
            return
        minute = int(decided_at // _BUCKET_S)
        if not self._minutes or self._minutes[-1][0] < minute:
            self._minutes.append((minute, [number]))
        else:  # the same minute, or a clock that stepped back: expires with the newest
            self._minutes[-1][1].append(number)

    def covers(self, created_at: float, now: float) -> bool:
        """Whether a command created at ``created_at`` is new enough for its id to be remembered if decided."""
        return not self.window_s or created_at >= now - self.window_s

    def expire(self, now: float) -> int:
        """Forget the ids decided more than ``window_s`` before ``now``; returns how many."""
        if not self.window_s:
            return 0
        oldest_kept = int((now - self.window_s) // _BUCKET_S)
        forgotten = 0
        while self._minutes and self._minutes[0][0] < oldest_kept:
            _, ids = self._minutes.popleft()
            self._ids.difference_update(ids)
            forgotten += len(ids)
        return forgotten


@dataclass
class PartitionState:
    """Every aggregate on one partition, and the command ids decided there within the window."""

    aggregates: dict[str, AggregateState] = field(default_factory=dict)
    decided: DecidedIds = field(default_factory=DecidedIds)

    @classmethod
    def keeping_ids_for(cls, window_s: float) -> PartitionState:
        """An empty partition state that forgets decided ids after ``window_s`` (0: never)."""
        return cls(decided=DecidedIds(window_s))

    def apply(self, events: Iterable[Envelope]) -> None:
        """Fold committed events into the state."""
        for event in events:
            self.aggregates[event.key] = evolve_aggregate(self.aggregates.get(event.key, EMPTY), event)
            if event.causation_id is not None:
                self.decided.add(event.causation_id, event.occurred_at.timestamp())


@dataclass
class BatchView:
    """Uncommitted changes of one transaction, layered over the partition states."""

    base: dict[int, PartitionState]
    aggregates: dict[tuple[int, str], AggregateState] = field(default_factory=dict)
    decided: set[tuple[int, uuid.UUID]] = field(default_factory=set)

    def state(self, partition: int, key: str) -> AggregateState:
        """The aggregate's state including this batch's changes."""
        staged = self.aggregates.get((partition, key))
        if staged is not None:
            return staged
        return self.base[partition].aggregates.get(key, EMPTY)

    def already_decided(self, partition: int, command_id: uuid.UUID) -> bool:
        """True when the command was decided before (its events exist or are staged)."""
        return (partition, command_id) in self.decided or command_id in self.base[partition].decided

    def remembers_ids_from(self, partition: int, created_at: float, now: float) -> bool:
        """Whether a command created at ``created_at`` is inside the partition's dedupe window."""
        return self.base[partition].decided.covers(created_at, now)

    def dedupe_window_s(self, partition: int) -> float:
        """How long the partition remembers decided command ids (0: for ever)."""
        return self.base[partition].decided.window_s

    def record(self, partition: int, command_id: uuid.UUID, events: Iterable[Envelope]) -> None:
        """Stage the command's events."""
        for event in events:
            self.aggregates[(partition, event.key)] = evolve_aggregate(self.state(partition, event.key), event)
        self.decided.add((partition, command_id))

    def commit(self, decided_at: float) -> None:
        """Make the staged changes part of the partition states (after the Kafka commit).

        ``decided_at`` is the batch's decision time: its ids are remembered from then, and
        ids decided a window before it are forgotten.
        """
        for (partition, key), state in self.aggregates.items():
            if partition in self.base:
                self.base[partition].aggregates[key] = state
        for partition, command_id in self.decided:
            if partition in self.base:
                self.base[partition].decided.add(command_id, decided_at)
        for partition_state in self.base.values():
            partition_state.decided.expire(decided_at)
