"""Turning what ``decide`` returned into event envelopes with deterministic ids.

Event ids derive from the command id and the event's index, so a re-run of the same
command (after a crash, on another worker) yields byte-identical ids that any consumer
can dedupe on. Versions continue the aggregate's sequence; rejections carry none.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from keel.domain.envelope import Envelope, Payload
from keel.domain.messages import CommandRejected

_EVENT_NAMESPACE = uuid.UUID("6f1c4b0e-7d4a-5b8e-9c1f-3a2d5e6f7a8b")


def event_id(command_id: uuid.UUID, index: int) -> uuid.UUID:
    """The deterministic id of the ``index``-th event caused by ``command_id``."""
    return uuid.uuid5(_EVENT_NAMESPACE, f"{command_id}/{index}")


def to_events(
    command: Envelope, payloads: Sequence[Payload], *, version: int, now: datetime
) -> list[Envelope]:
    """Envelopes for ``payloads``, attributed to the command's actor and authority."""
    events = []
    for index, payload in enumerate(payloads):
        if not isinstance(payload, CommandRejected):
            version += 1
        events.append(Envelope(
            id=event_id(command.id, index),
            tenant_id=command.tenant_id,
            actor=command.actor,
            delegation=command.delegation,
            on_behalf_of=command.on_behalf_of,
            authority=command.authority,
            type=type(payload).__name__,
            schema_version=payload.schema_version,
            aggregate_id=command.aggregate_id,
            version=None if isinstance(payload, CommandRejected) else version,
            causation_id=command.id,
            correlation_id=command.correlation_id,
            occurred_at=now,
            traceparent=command.traceparent,
            payload=payload,
        ))
    return events
