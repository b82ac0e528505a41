"""Maps a decoded event envelope and its Kafka position to a row of the ``events`` table.

Pure (no Kafka, no ClickHouse) so the mapping is unit-tested on its own. Nested parts
(payload, delegation) become JSON strings with sorted keys: stable text that ClickHouse's
JSON functions read, whatever the payload type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from keel.domain.envelope import Envelope

EVENTS_TABLE = "events"

EVENT_COLUMNS: tuple[str, ...] = (
    "tenant_id", "aggregate_id", "version", "event_id", "type", "schema_version",
    "actor_kind", "actor_id", "delegation", "on_behalf_of",
    "authority_role", "authority_grant", "authority_policy_rule", "authority_policy_version",
    "authority_approval_id", "expected_version", "causation_id", "correlation_id",
    "occurred_at", "traceparent", "payload", "_topic", "_partition", "_offset",
)


@dataclass(frozen=True)
class Position:
    """Where a record sits in Kafka; stored with its row so the projection knows where to resume."""

    topic: str
    partition: int
    offset: int


def event_row(event: Envelope, position: Position) -> list[Any]:
    """The ``events`` row for ``event`` read at ``position``, in ``EVENT_COLUMNS`` order."""
    authority = event.authority
    return [
        event.tenant_id,
        event.aggregate_id,
        event.version,
        event.id,
        event.type,
        event.schema_version,
        event.actor.kind.value,
        event.actor.id,
        _json([link.model_dump(mode="json") for link in event.delegation]),
        event.on_behalf_of,
        authority.role,
        authority.grant,
        authority.policy_rule,
        authority.policy_version,
        authority.approval_id,
        event.expected_version,
        event.causation_id,
        event.correlation_id,
        event.occurred_at,
        event.traceparent,
        _json(event.payload.model_dump(mode="json")),
        position.topic,
        position.partition,
        position.offset,
    ]


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
