"""Where a replay starts and stops, and which records it keeps.

A bound is ``beginning`` (start only), ``end`` (end only: the end of each partition when the
replay starts), ``offset:N`` (offset N in every partition) or an ISO-8601 time (the first
record at or after it, by broker timestamp). The end is exclusive. Bounds resolve to one
start and one end offset per partition, through Kafka's own ``offsets_for_times``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from keel.domain.envelope import Envelope
from keel.kafka.errors import topic_partitions
from keel.kafka.reader import watermarks
from keel.replay.errors import ReplayError

_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Bound:
    """One end of a replay range: the log's edge, an offset, or a time."""

    kind: str  # "beginning" | "end" | "offset" | "time"
    offset: int = 0
    at: datetime | None = None

    @classmethod
    def parse(cls, text: str) -> Bound:
        """``beginning``, ``end``, ``offset:N`` or an ISO-8601 time (UTC unless it says otherwise)."""
        value = text.strip()
        if value in ("beginning", "end"):
            return cls(kind=value)
        if value.startswith("offset:"):
            number = value.removeprefix("offset:")
            if not number.isdigit():
                raise ReplayError(f"{text!r}: an offset bound is offset:N with N >= 0", code="bad_bound")
            return cls(kind="offset", offset=int(number))
        try:
            at = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ReplayError(f"{text!r} is not beginning, end, offset:N or an ISO-8601 time",
                              code="bad_bound") from None
        return cls(kind="time", at=at if at.tzinfo else at.replace(tzinfo=UTC))

    @property
    def millis(self) -> int:
        """The time bound as Kafka timestamps count it."""
        assert self.at is not None
        return int(self.at.timestamp() * 1000)


@dataclass(frozen=True)
class Filter:
    """Which records a replay keeps; ``None`` keeps every value of that field."""

    tenant: str | None = None
    aggregate: str | None = None
    types: frozenset[str] = frozenset()
    actor: str | None = None

    def key_may_match(self, key: bytes | None) -> bool:
        """A cheap test on the ``tenant/aggregate`` key before decoding the value."""
        if self.tenant is None or key is None:
            return True
        tenant, _, aggregate = key.decode("utf-8", "replace").partition("/")
        return tenant == self.tenant and (self.aggregate is None or aggregate == self.aggregate)

    def matches(self, event: Envelope) -> bool:
        """True when ``event`` passes every filter."""
        return ((self.tenant is None or event.tenant_id == self.tenant)
                and (self.aggregate is None or event.aggregate_id == self.aggregate)
                and (not self.types or event.type in self.types)
                and (self.actor is None or event.actor.id == self.actor))


def check_order(start: Bound, end: Bound) -> None:
    """Refuse a range whose end comes before its start when both say where they are."""
    if start.kind == "end" or end.kind == "beginning":
        raise ReplayError("a replay starts at beginning, offset:N or a time, and ends at end, offset:N or a time",
                          code="bad_bound")
    inverted = ((start.kind == end.kind == "offset" and end.offset <= start.offset)
                or (start.kind == end.kind == "time" and end.millis <= start.millis))
    if inverted:
        raise ReplayError("the replay range is inverted or empty: its end is not after its start",
                          code="inverted_range")


def resolve(consumer: Consumer, config: Mapping[str, Any], topic: str, start: Bound,
            end: Bound) -> dict[int, tuple[int, int]]:
    """``partition -> (first offset, end offset)`` for the partitions that have records in range
    (``config``: the consumer's, to name its principal if the ACLs deny the topic)."""
    check_order(start, end)
    partitions = topic_partitions(consumer, config, topic, _TIMEOUT_S)
    if not partitions:
        raise ReplayError(f"topic {topic} does not exist", code="topic_missing")
    ranges: dict[int, tuple[int, int]] = {}
    for partition in partitions:
        low, high = watermarks(consumer, TopicPartition(topic, partition), _TIMEOUT_S)
        first = _offset(consumer, topic, partition, start, low, high)
        last = _offset(consumer, topic, partition, end, low, high)
        if first < last:
            ranges[partition] = (first, last)
    if not ranges:
        raise ReplayError(f"no records of {topic} fall in the replay range", code="empty_range")
    return ranges


def _offset(consumer: Consumer, topic: str, partition: int, bound: Bound, low: int, high: int) -> int:
    if bound.kind == "beginning":
        return low
    if bound.kind == "end":
        return high
    if bound.kind == "offset":
        return min(max(bound.offset, low), high)
    found = consumer.offsets_for_times([TopicPartition(topic, partition, bound.millis)], timeout=_TIMEOUT_S)[0]
    return high if found.offset < 0 else min(max(found.offset, low), high)  # -1: nothing at or after it
