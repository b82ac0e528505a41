"""Aggregate state owned by one processor worker, folded from its own events.

The processor's only state is the events it wrote: on partition assignment it reads its
partition of the events topic (``read_committed``) and folds it with the domain's
``evolve`` (plus the parked approvals). No second store can drift from the log. Changes made while a transaction is
open live in a ``BatchView`` and reach the partition state only after the commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from keel.domain.envelope import Envelope
from keel.domain.aggregate import EMPTY, AggregateState, evolve_aggregate


@dataclass
class PartitionState:
    """Every aggregate on one partition, and the command ids already decided there."""

    aggregates: dict[str, AggregateState] = field(default_factory=dict)
    decided: set[uuid.UUID] = field(default_factory=set)

    def apply(self, events: Iterable[Envelope]) -> None:
        """Fold committed events into the state."""
        for event in events:
            self.aggregates[event.key] = evolve_aggregate(self.aggregates.get(event.key, EMPTY), event)
            if event.causation_id is not None:
                self.decided.add(event.causation_id)


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

    def record(self, partition: int, command_id: uuid.UUID, events: Iterable[Envelope]) -> None:
        """Stage the command's events."""
        for event in events:
            self.aggregates[(partition, event.key)] = evolve_aggregate(self.state(partition, event.key), event)
        self.decided.add((partition, command_id))

    def commit(self) -> None:
        """Make the staged changes part of the partition states (after the Kafka commit)."""
        for (partition, key), state in self.aggregates.items():
            if partition in self.base:
                self.base[partition].aggregates[key] = state
        for partition, command_id in self.decided:
            if partition in self.base:
                self.base[partition].decided.add(command_id)
