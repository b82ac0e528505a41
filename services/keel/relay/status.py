"""How events and dead letters map to command statuses (pure; the tracker applies them).

Every event names its command by ``causation_id``; approval events name it by
``payload.command_id``. Types not listed here are the command's effects: ``executed``.
"""

from __future__ import annotations

import uuid

from keel.domain.envelope import Envelope
from keel.outbox.models import CommandStatus, Outcome, TrackedEvent

# event type -> (status, reason code); a None status records the event and changes nothing.
EVENT_STATUS: dict[str, tuple[CommandStatus | None, str | None]] = {
    "CommandRejected": (CommandStatus.REJECTED, None),
    "ApprovalRequested": (CommandStatus.PENDING_APPROVAL, None),
    "ApprovalGranted": (None, None),
    "ApprovalRejected": (CommandStatus.REJECTED, "approval_rejected"),
    "ApprovalExpired": (CommandStatus.REJECTED, "approval_expired"),
}


def event_outcome(event: Envelope) -> Outcome | None:
    """What ``event`` says about its command; None when it names no command."""
    named = getattr(event.payload, "command_id", None)
    command_id = uuid.UUID(str(named)) if named is not None else event.causation_id
    if command_id is None:
        return None
    status, code = EVENT_STATUS.get(event.type, (CommandStatus.EXECUTED, None))
    payload = event.payload.model_dump(mode="json")
    reason = payload.get("reason") if status is CommandStatus.REJECTED else None
    return Outcome(
        command_id=command_id, status=status,
        reason_code=payload.get("code", code) if status is CommandStatus.REJECTED else None,
        reason=str(reason) if reason is not None else None,
        event=TrackedEvent(event_id=event.id, type=event.type,
                           occurred_at=event.occurred_at.isoformat(), payload=payload),
    )


def dead_letter_outcome(command: Envelope, code: str, reason: str) -> Outcome:
    """A command the processor dead-lettered, with the processor's reason."""
    return Outcome(command_id=command.id, status=CommandStatus.DEAD_LETTERED, reason_code=code, reason=reason)
