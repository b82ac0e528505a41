"""What the outbox holds: a command's durable record, its status, and what the relay reads."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Model(BaseModel):
    """Base of the outbox's records: immutable."""

    model_config = ConfigDict(frozen=True)


class CommandStatus(StrEnum):
    """Where a command is between acknowledgement and its outcome."""

    ACCEPTED = "accepted"
    PUBLISHED = "published"
    PENDING_APPROVAL = "pending_approval"
    EXECUTED = "executed"
    REJECTED = "rejected"
    DEAD_LETTERED = "dead_lettered"


# A status only moves forward: a late delivery report never hides an outcome.
RANK = {
    CommandStatus.ACCEPTED: 0,
    CommandStatus.PUBLISHED: 1,
    CommandStatus.PENDING_APPROVAL: 2,
    CommandStatus.EXECUTED: 3,
    CommandStatus.REJECTED: 3,
    CommandStatus.DEAD_LETTERED: 3,
}
TERMINAL = frozenset(status for status, rank in RANK.items() if rank == 3)


class NewCommand(Model):
    """A validated, encoded command and the idempotency fingerprint of the request."""

    command_id: uuid.UUID
    tenant_id: str
    key: str = Field(description="The Kafka key, tenant/aggregate.")
    command_type: str
    actor: str = Field(description="kind:id of the authenticated actor.")
    request_hash: str = Field(description="sha256 of the canonical request body.")
    value: bytes = Field(description="The Avro single-object encoding of the envelope.")


class Accepted(Model):
    """What a write of one command returned."""

    command_id: uuid.UUID
    status: CommandStatus
    replayed: bool = Field(description="The id was accepted before with the same body.")
    conflict: bool = Field(default=False, description="The id was accepted before with another body.")


class PendingRow(Model):
    """An unpublished outbox row, as the relay reads it."""

    seq: int
    command_id: uuid.UUID
    key: str
    value: bytes


class TrackedEvent(Model):
    """An event that followed from a command, as ``GET /v1/commands/{id}`` shows it."""

    event_id: uuid.UUID
    type: str
    occurred_at: str
    payload: dict[str, Any]


class Outcome(Model):
    """What the status tracker learnt about one command from one record."""

    command_id: uuid.UUID
    status: CommandStatus | None = Field(description="None: the record changes no status.")
    reason_code: str | None = None
    reason: str | None = None
    event: TrackedEvent | None = None
    subject_command_id: uuid.UUID | None = Field(
        default=None, description="The other command this one acted on: the parked command an approval "
                                  "approved, rejected or expired, or the command a compensation undid. "
                                  "The status record says it in ``reason``.")


class CommandRecord(Model):
    """A command's status and, once processed, its events."""

    command_id: uuid.UUID
    tenant_id: str
    command_type: str
    key: str
    status: CommandStatus
    reason_code: str | None = None
    reason: str | None = None
    created_at: float
    updated_at: float
    events: tuple[TrackedEvent, ...] = ()
