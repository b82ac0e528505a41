"""Turning decided payloads into event envelopes with deterministic ids.

Event ids derive from the deciding command's id and the event's index, so a re-run of the
same command (after a crash, on another worker) yields identical ids that any consumer can
dedupe on. Versions continue the aggregate's sequence; outcome-only events (rejections)
carry none. ``origin`` is the command the events are *about*: usually the deciding command
itself, but the parked command when an approval resumes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from keel.domain.envelope import Authority, Envelope, Payload
from keel.domain.messages import CommandRejected

_EVENT_NAMESPACE = uuid.UUID("6f1c4b0e-7d4a-5b8e-9c1f-3a2d5e6f7a8b")


def event_id(command_id: uuid.UUID, index: int) -> uuid.UUID:
    """The deterministic id of the ``index``-th event caused by ``command_id``."""
    return uuid.uuid5(_EVENT_NAMESPACE, f"{command_id}/{index}")


def to_events(
    command: Envelope,
    payloads: Sequence[Payload],
    *,
    version: int,
    now: datetime,
    authority: Authority | None = None,
    origin: Envelope | None = None,
    first_index: int = 0,
) -> list[Envelope]:
    """Envelopes for ``payloads``, attributed to ``origin``'s actor (default: ``command``)."""
    origin = origin or command
    events = []
    for index, payload in enumerate(payloads, start=first_index):
        outcome_only = isinstance(payload, CommandRejected)
        if not outcome_only:
            version += 1
        events.append(Envelope.model_construct(
            id=event_id(command.id, index),
            tenant_id=origin.tenant_id,
            actor=origin.actor,
            delegation=origin.delegation,
            on_behalf_of=origin.on_behalf_of,
            authority=authority or origin.authority,
            type=type(payload).__name__,
            schema_version=payload.schema_version,
            aggregate_id=origin.aggregate_id,
            expected_version=None,
            version=None if outcome_only else version,
            causation_id=origin.id,
            correlation_id=origin.correlation_id,
            occurred_at=now,
            traceparent=origin.traceparent,
            payload=payload,
        ))
    return events
