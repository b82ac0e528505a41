"""Pure counting rules of the stats watcher: what a message counts as, and how counts add up.

No faust and no Kafka here, so the rules are unit-tested in isolation. The watcher keys its
windowed table by ``tenant/source/partition`` (``source`` = commands | events): every key is
then written from exactly one source partition, which is the partition faust sends the
table's changelog record to. That keeps each key on one changelog partition (correct recovery,
any number of workers) without a repartition topic; readers sum the partitions back up.
Each value carries the highest source offset counted into it, so a message re-delivered
after a crash (faust is at-least-once) is recognised and not counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from keel.domain.envelope import Envelope
from keel.domain.outcomes import event_id

REJECTED_TYPE = "CommandRejected"
UNKNOWN_TENANT = "-"  # not a valid tenant id (they start with a letter or digit): no collision
_SEPARATOR = "/"  # tenant ids never contain '/'


class Source(StrEnum):
    """Which topic a counted message came from."""

    COMMANDS = "commands"
    EVENTS = "events"


class Metric(StrEnum):
    """What one message counts as."""

    COMMANDS = "commands"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    UNDECODABLE = "undecodable"


def classify_event(event: Envelope) -> Metric | None:
    """The decision an event reports, or ``None`` if it is not its command's first event.

    A command's outcome starts at index 0: exactly one ``CommandRejected`` when refused, else
    its first domain event. Later events of the same command are not decisions.
    """
    if event.causation_id is None or event.id != event_id(event.causation_id, 0):
        return None
    return Metric.REJECTED if event.type == REJECTED_TYPE else Metric.ACCEPTED


def classify(source: Source, envelope: Envelope) -> Metric | None:
    """What a decoded message from ``source`` counts as (``None``: not counted)."""
    return Metric.COMMANDS if source is Source.COMMANDS else classify_event(envelope)


def table_key(tenant_id: str, source: Source, partition: int) -> str:
    """The stats table key: one tenant's counts from one source partition."""
    return _SEPARATOR.join((tenant_id, source.value, str(partition)))


def tenant_of(key: str) -> str:
    """The tenant part of a stats table key."""
    return key.split(_SEPARATOR, 1)[0]


@dataclass(frozen=True)
class Counts:
    """Counts of one table key in one window, and the last source offset counted in them."""

    commands: int = 0
    accepted: int = 0
    rejected: int = 0
    undecodable: int = 0
    offset: int = -1

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Counts:
        """Counts from a table value (a JSON object); unknown fields are ignored."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise TypeError(f"counts must be a JSON object, got {type(data).__name__}")
        return cls(**{name: int(data[name]) for name in cls.__dataclass_fields__ if name in data})

    def to_json(self) -> dict[str, int]:
        """The table value (a JSON object)."""
        return asdict(self)

    def add(self, metric: Metric, offset: int) -> Counts | None:
        """These counts plus one ``metric`` at source ``offset``; ``None`` if already counted."""
        if offset <= self.offset:
            return None
        field = metric.value
        return replace(self, offset=offset, **{field: getattr(self, field) + 1})

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.commands + other.commands, self.accepted + other.accepted,
                      self.rejected + other.rejected, self.undecodable + other.undecodable,
                      max(self.offset, other.offset))


@dataclass(frozen=True)
class StatsRow:
    """One line of ``keel stats``: a tenant's counts in one minute."""

    minute: datetime
    tenant: str
    counts: Counts


def summarise(
    windows: Mapping[tuple[str, float], Counts],
    *,
    tenant: str | None = None,
    since: datetime | None = None,
) -> list[StatsRow]:
    """Sum ``(table key, window start) -> counts`` per (minute, tenant), oldest first."""
    totals: dict[tuple[float, str], Counts] = {}
    for (key, start), counts in windows.items():
        key_tenant = tenant_of(key)
        if tenant is not None and key_tenant != tenant:
            continue
        if since is not None and start < since.timestamp():
            continue
        slot = (start, key_tenant)
        totals[slot] = totals.get(slot, Counts()) + counts
    return [StatsRow(datetime.fromtimestamp(start, UTC), key_tenant, counts)
            for (start, key_tenant), counts in sorted(totals.items())]


def minutes_since(minutes: int, now: datetime) -> datetime:
    """The start of the oldest of the last ``minutes`` one-minute windows, the current one included."""
    current = now.astimezone(UTC).replace(second=0, microsecond=0)
    return current - timedelta(minutes=max(minutes, 1) - 1)


def totals_by_tenant(rows: Iterable[StatsRow]) -> dict[str, Counts]:
    """The counts of ``rows`` summed per tenant, over all minutes."""
    totals: dict[str, Counts] = {}
    for row in rows:
        totals[row.tenant] = totals.get(row.tenant, Counts()) + row.counts
    return totals
