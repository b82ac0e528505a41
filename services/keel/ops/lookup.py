"""Finding a command's trail in the events topic: for approvals and for undo."""

from __future__ import annotations

import uuid

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.aggregate import EMPTY, AggregateState, evolve_aggregate
from keel.domain.envelope import Envelope
from keel.domain.messages import ApprovalRequested
from keel.errors import KeelError
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name


def tenant_events(settings: Settings, tenant_id: str) -> list[Envelope]:
    """Every committed event of ``tenant_id``, in per-aggregate log order."""
    codec = EnvelopeCodec()
    events = (codec.decode(m.value() or b"") for m in read_to_end(settings, topic_name(settings, Topic.EVENTS)))
    return [e for e in events if e.tenant_id == tenant_id]


def events_of_command(settings: Settings, tenant_id: str, command_id: uuid.UUID) -> list[Envelope]:
    """The events a command caused (including those after its approval)."""
    found = [e for e in tenant_events(settings, tenant_id) if e.causation_id == command_id]
    if not found:
        raise KeelError(f"tenant {tenant_id} has no events of command {command_id}", code="command_not_found")
    return found


def pending_approvals(settings: Settings, tenant_id: str) -> dict[str, AggregateState]:
    """Aggregates of ``tenant_id`` that have commands waiting, with their state."""
    states: dict[str, AggregateState] = {}
    for event in tenant_events(settings, tenant_id):
        states[event.aggregate_id] = evolve_aggregate(states.get(event.aggregate_id, EMPTY), event)
    return {aggregate: state for aggregate, state in states.items() if state.pending}


def parked_aggregate(settings: Settings, tenant_id: str, command_id: uuid.UUID) -> str:
    """The aggregate on which ``command_id`` waits for approval."""
    for event in events_of_command(settings, tenant_id, command_id):
        if isinstance(event.payload, ApprovalRequested):
            return event.aggregate_id
    raise KeelError(f"command {command_id} never waited for approval", code="not_pending")
