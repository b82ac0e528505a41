"""The envelope every command and event travels in, as frozen pydantic models.

These models validate at the edges (SDK, gateway, decoders). The Avro schema in
``schemas/envelope`` is the wire contract; ``tests/unit/test_contracts.py`` proves the two
agree. The payload is polymorphic: ``type`` selects the payload class from the registry
in ``keel.domain.messages``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, StrictInt, field_validator, model_validator

Identifier = str  # tenant, aggregate and actor ids: short, printable, no '/' (it separates keys)

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"


class Frozen(BaseModel):
    """Base of every message model: immutable and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ActorKind(StrEnum):
    """Who can act: an AI agent, a person, or a service."""

    AGENT = "agent"
    HUMAN = "human"
    SERVICE = "service"


class Actor(Frozen):
    """The principal that triggered a message."""

    kind: ActorKind
    id: Identifier = Field(pattern=_ID_PATTERN, description="Actor id within the tenant.")


class DelegationLink(Frozen):
    """One hop of the chain that led to the actor (user -> agent -> tool)."""

    actor: Actor
    reason: str | None = Field(default=None, max_length=1000)


class Authority(Frozen):
    """What authorised the message: a role, a grant, a policy rule, an approval."""

    role: str | None = None
    grant: str | None = None
    policy_rule: str | None = None
    policy_version: str | None = None
    approval_id: str | None = None


class Payload(Frozen):
    """Base of every message type's payload; subclasses register themselves by name."""

    kind: ClassVar[Literal["command", "event"]]
    schema_version: ClassVar[int] = 1


class Envelope(Frozen):
    """A command or an event: who, on whose behalf, under what authority, and what."""

    id: uuid.UUID
    tenant_id: Identifier = Field(pattern=_ID_PATTERN)
    actor: Actor
    delegation: tuple[DelegationLink, ...] = ()
    on_behalf_of: str | None = Field(default=None, max_length=200)
    authority: Authority = Authority()
    type: str
    schema_version: StrictInt = Field(default=1, ge=1)
    aggregate_id: Identifier = Field(pattern=_ID_PATTERN)
    expected_version: StrictInt | None = Field(default=None, ge=0)
    version: StrictInt | None = Field(default=None, ge=1)
    causation_id: uuid.UUID | None = None
    correlation_id: uuid.UUID
    occurred_at: datetime
    traceparent: str | None = Field(default=None, max_length=128)
    payload: SerializeAsAny[Payload]

    @model_validator(mode="before")
    @classmethod
    def _resolve_payload(cls, data: Any) -> Any:
        """Turn a raw payload mapping into the payload class its ``type`` names."""
        if isinstance(data, dict) and isinstance(data.get("payload"), dict):  # decoders pass a model already
            from keel.domain.messages import payload_class  # registry imports this module

            data = {**data, "payload": payload_class(str(data.get("type")))(**data["payload"])}
        return data

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone")
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _payload_matches_type(self) -> Envelope:
        if type(self.payload).__name__ != self.type:
            raise ValueError(f"payload is a {type(self.payload).__name__}, type says {self.type}")
        return self

    @property
    def key(self) -> str:
        """The Kafka key: one tenant's aggregate always lands on one partition."""
        return f"{self.tenant_id}/{self.aggregate_id}"


def new_command(
    payload: Payload,
    *,
    tenant_id: str,
    aggregate_id: str,
    actor: Actor,
    on_behalf_of: str | None = None,
    delegation: tuple[DelegationLink, ...] = (),
    authority: Authority | None = None,
    expected_version: int | None = None,
    command_id: uuid.UUID | None = None,
    causation_id: uuid.UUID | None = None,
    correlation_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
    traceparent: str | None = None,
) -> Envelope:
    """Wrap a command payload in a fresh envelope (new id, now, its own correlation)."""
    if payload.kind != "command":
        raise ValueError(f"{type(payload).__name__} is an event, not a command")
    command_id = command_id or uuid.uuid4()
    return Envelope(
        id=command_id,
        tenant_id=tenant_id,
        actor=actor,
        delegation=delegation,
        on_behalf_of=on_behalf_of,
        authority=authority or Authority(),
        type=type(payload).__name__,
        schema_version=payload.schema_version,
        aggregate_id=aggregate_id,
        expected_version=expected_version,
        causation_id=causation_id,
        correlation_id=correlation_id or command_id,
        occurred_at=occurred_at or datetime.now(UTC),
        traceparent=traceparent,
        payload=payload,
    )
