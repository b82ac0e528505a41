"""Point-in-time state: an aggregate as it was at a version or a time, and the events that led there.

The events come from the ``events`` projection (one aggregate lives on one partition, so its
Kafka offsets are its order) and are folded with the domain's own ``evolve``, the function
the processor folds with, so this state is the one the processor decided against.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from keel.contracts.codec import parse_envelope
from keel.domain.envelope import Envelope
from keel.errors import InfraError
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
             evolve: Callable[[S, Envelope], S], initial: S) -> PointInTime[S]:
    """Fold ``tenant``/``aggregate``'s events up to version ``at`` (inclusive) or time ``at``."""
    history = _history(client, tenant, aggregate)
    if not history:
        raise ReplayError(f"no events of {tenant}/{aggregate} are projected", code="unknown_aggregate")
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
    return PointInTime(state=state, events=tuple(chosen))


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
