"""Which offset of an events partition an effect worker may commit.

Every record before the commit point must be settled for good: a record that carries no
effect is settled once read; an effect's record only once Kafka acknowledged its outcome
command (or the outcome was seen recorded). The commit point is therefore the lowest
record still held, or else the one after the last record read. A worker that dies runs
again, from the commit point, exactly the effects whose outcome was not recorded, under
the same idempotency keys.
"""

from __future__ import annotations

import heapq


class PartitionOffsets:
    """The held records of one partition, and its commit point."""

    def __init__(self) -> None:
        self._held: list[int] = []  # a heap; released offsets leave it lazily
        self._released: set[int] = set()
        self._next: int | None = None

    def read(self, offset: int) -> None:
        """A record at ``offset`` was read (records are read in offset order)."""
        self._next = offset + 1

    def hold(self, offset: int) -> None:
        """The record at ``offset`` (already ``read``) stays unsettled until ``release``."""
        heapq.heappush(self._held, offset)

    def release(self, offset: int) -> None:
        """The held record at ``offset`` is settled (call once per ``hold``)."""
        self._released.add(offset)

    def commit_point(self) -> int | None:
        """The offset to commit (the next record to read after a restart); ``None`` before any record."""
        while self._held and self._held[0] in self._released:
            self._released.discard(heapq.heappop(self._held))
        return self._held[0] if self._held else self._next
