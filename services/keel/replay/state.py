"""Point-in-time state: an aggregate as it was at a version or a time, and the events that led there.

The events come from the ``events`` projection (one aggregate lives on one partition, so its
Kafka offsets are its order) and are folded with the domain's own ``evolve``, the function
the processor folds with, so this state is the one the processor decided against. The
projection may lag behind Kafka, so the aggregate's committed events past what it holds
are read from the events topic itself (``unprojected_events``) and folded after them: the
answer is never silently stale, and says how many events came from Kafka.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec, parse_envelope
from keel.domain.envelope import Envelope
from keel.errors import InfraError
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.projector.store import stored_offsets
from keel.replay.errors import ReplayError

S = TypeVar("S")

_EVENTS = """
SELECT * FROM events FINAL
WHERE tenant_id = {tenant:String} AND aggregate_id = {aggregate:String}
ORDER BY _partition, _offset
"""


@dataclass(frozen=True)
class PointInTime(Generic[S]):
    """The folded state and the events folded into it (rejections included, they change nothing)."""

    state: S
    events: tuple[Envelope, ...]
    unprojected: int = 0
    """How many of the aggregate's events came from Kafka because the projection did not hold them yet."""


def parse_at(text: str) -> int | datetime:
    """A version (a whole number) or an ISO-8601 time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(f"--at {text!r} is neither a version nor an ISO-8601 time", code="bad_bound") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def state_at(client: Client, tenant: str, aggregate: str, at: int | datetime, *,
             evolve: Callable[[S, Envelope], S], initial: S, tail: Sequence[Envelope] = ()) -> PointInTime[S]:
    """Fold ``tenant``/``aggregate``'s events up to version ``at`` (inclusive) or time ``at``.

    ``tail``: the aggregate's events read from Kafka past the projection (``unprojected_events``).
    """
    history = _history(client, tenant, aggregate)
    projected = {event.id for event in history}
    unprojected = [event for event in tail if event.id not in projected]
    history += unprojected
    if not history:
        raise ReplayError(f"{tenant}/{aggregate} has no events, in the projection or in Kafka",
                          code="unknown_aggregate")
    if isinstance(at, int):
        versions = [e.version for e in history if e.version is not None]
        if at not in versions and at != 0:
            raise ReplayError(f"{tenant}/{aggregate} has versions 1..{max(versions, default=0)}, not {at}",
                              code="version_not_found")
        cut = next((i for i, e in enumerate(history) if e.version == at), -1) + 1
        chosen = history[:cut]
    else:
        chosen = [e for e in history if e.occurred_at <= at]
    state = initial
    for event in chosen:
        state = evolve(state, event)
    return PointInTime(state=state, events=tuple(chosen), unprojected=len(unprojected))


def unprojected_events(settings: Settings, client: Client, tenant: str, aggregate: str) -> list[Envelope]:
    """The aggregate's committed events that the ``events`` projection does not hold yet, read from Kafka."""
    topic = topic_name(settings, Topic.EVENTS)
    starts = {partition: offset + 1 for partition, offset in stored_offsets(client, topic).items()}
    key, codec = f"{tenant}/{aggregate}".encode(), EnvelopeCodec()
    return [codec.decode(message.value() or b"") for message in read_to_end(settings, topic, starts=starts)
            if message.key() == key]


def _history(client: Client, tenant: str, aggregate: str) -> list[Envelope]:
    try:
        rows = list(client.query(_EVENTS, parameters={"tenant": tenant, "aggregate": aggregate}).named_results())
    except ClickHouseError as exc:
        raise InfraError(f"cannot read the events of {tenant}/{aggregate}: {exc}",
                         code="projection_unavailable") from exc
    return [parse_envelope(_envelope(row)) for row in rows]


def _envelope(row: dict[str, Any]) -> dict[str, Any]:
    """The envelope mapping a projected row came from (the inverse of ``keel.projector.rows``)."""
    authority = {key: row[f"authority_{key}"] for key in ("role", "grant", "policy_rule", "policy_version",
                                                           "approval_id")}
    return {
        "id": row["event_id"], "tenant_id": row["tenant_id"], "aggregate_id": row["aggregate_id"],
        "actor": {"kind": row["actor_kind"], "id": row["actor_id"]},
        "delegation": json.loads(row["delegation"]), "on_behalf_of": row["on_behalf_of"],
        "authority": authority, "type": row["type"], "schema_version": row["schema_version"],
        "expected_version": row["expected_version"], "version": row["version"],
        "causation_id": row["causation_id"], "correlation_id": row["correlation_id"],
        "occurred_at": row["occurred_at"], "traceparent": row["traceparent"],
        "payload": json.loads(row["payload"]),
    }
