"""What the outbox holds: a command's durable record, its status and effects, and what the relay reads."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, computed_field

from keel.effects.progress import SETTLED, EffectState, WaitReason
from keel.effects.status import EffectRecord


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


class NewCommand(NamedTuple):
    """A validated, encoded command and the idempotency fingerprint of the request.

    ``key`` is the Kafka key (tenant/aggregate), ``actor`` the authenticated actor's kind:id,
    ``request_hash`` the sha256 of the canonical request body, ``value`` the Avro single-object
    encoding of the envelope. Built from an envelope already validated: a tuple, not a model
    validated again (the gateway makes one per request).
    """

    command_id: uuid.UUID
    tenant_id: str
    key: str
    command_type: str
    actor: str
    request_hash: str
    value: bytes


class Accepted(NamedTuple):
    """What a write of one command returned: ``replayed`` when the id was accepted before with the
    same body, ``conflict`` when with another."""

    command_id: uuid.UUID
    status: CommandStatus
    replayed: bool
    conflict: bool = False


class PendingRow(NamedTuple):
    """An unpublished outbox row, as the relay reads it (a tuple: one per command relayed, from columns
    the gateway wrote, with nothing left to validate)."""

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


class RecordedEvent(NamedTuple):
    """An event as the tracker keeps it: its Avro record from the events topic, made a
    ``TrackedEvent`` (decoded, its payload as JSON) only when someone reads its command.
    Most commands are never read, and decoding them cost a fifth of the tracker's instructions."""

    event_id: uuid.UUID
    type: str
    occurred_at: str
    record: bytes


class Outcome(NamedTuple):
    """What the status tracker learnt about one command from one record.

    ``status`` None: the record changes no status. ``subject_command_id``: the other command this
    one acted on (the parked command an approval approved, rejected or expired, the command a
    compensation undid, or the command whose effect it settled, cancelled or retried); the status
    record says it in ``reason``.

    Tuples, not models: the tracker builds one or two per event from values already typed (a
    validated envelope, or a record of the events topic's schema), and validating them again cost
    it a tenth of its instructions.
    """

    command_id: uuid.UUID
    status: CommandStatus | None
    reason_code: str | None = None
    reason: str | None = None
    event: TrackedEvent | RecordedEvent | None = None
    subject_command_id: uuid.UUID | None = None


class Summary(Model):
    """What the agent waits on, in one look: its command's approval, then its effects."""

    state: EffectState = Field(description="pending until decided; waiting (approval) while parked; once "
                                            "executed, the effects' state (succeeded when it has none); "
                                            "failed when the command was refused.")
    reason: WaitReason | None = None
    detail: str | None = None
    done: bool = Field(description="The command is final and each of its effects settled.")


# Which effect speaks for the command: the first one waiting, else running, and so on.
_PRECEDENCE = (EffectState.WAITING, EffectState.RUNNING, EffectState.PENDING, EffectState.FAILED,
               EffectState.CANCELLED, EffectState.SUCCEEDED)


class CommandRecord(Model):
    """A command's status, its events once processed, and its effects."""

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
    effects: tuple[EffectRecord, ...] = Field(default=(), description="What carries its events into the "
                                                                      "outside world, in the order of its events.")

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented use
    @property
    def summary(self) -> Summary:
        """What the agent waits on (derived: it never disagrees with the status and effects)."""
        done = self.status in TERMINAL and all(effect.state in SETTLED for effect in self.effects)
        if self.status is CommandStatus.PENDING_APPROVAL:
            return Summary(state=EffectState.WAITING, reason=WaitReason.APPROVAL, done=False)
        if self.status in (CommandStatus.REJECTED, CommandStatus.DEAD_LETTERED):
            return Summary(state=EffectState.FAILED, detail=f"{self.status}: {self.reason_code}", done=done)
        if self.status is not CommandStatus.EXECUTED:
            return Summary(state=EffectState.PENDING, done=False)
        if not self.effects:
            return Summary(state=EffectState.SUCCEEDED, done=done)
        first = min(self.effects, key=lambda effect: _PRECEDENCE.index(effect.state))
        return Summary(state=first.state, reason=first.reason, detail=first.detail, done=done)
