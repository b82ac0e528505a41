"""Which compensation undoes a command, as its domain declares it (``Undo``): for ``keel undo`` and the gateway."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from keel.config import Settings
from keel.domain.envelope import Payload
from keel.domains.registry import current
from keel.errors import KeelError
from keel.ops.lookup import events_of_command


@dataclass(frozen=True)
class Compensation:
    """The compensating command for one executed command, and where and under which story it goes."""

    payload: Payload
    aggregate_id: str
    causation_id: uuid.UUID
    correlation_id: uuid.UUID
    """The undone command's correlation, so one trail shows the action and its undoing."""


def compensation_of(settings: Settings, tenant_id: str, command_id: uuid.UUID, reason: str) -> Compensation:
    """The compensation of ``command_id``'s last undoable event; ``command_not_found`` when it caused no
    event, ``irreversible`` when none of its events has an ``Undo``. Reads the tenant's events topic."""
    events = events_of_command(settings, tenant_id, command_id)
    undoable = [(event, found) for event in events if (found := current().undo_of.get(event.type)) is not None]
    if not undoable:
        raise KeelError(f"command {command_id} yielded {[e.type for e in events]}; none of them can be undone",
                        code="irreversible", field="command_id")
    event, declared = undoable[-1]
    return Compensation(declared.command(event, reason), events[0].aggregate_id, command_id,
                        events[0].correlation_id)
