"""What an effect is doing, as effect workers report it and the status tracker keeps it.

Outcomes are events (``EffectSucceeded``, ``EffectFailed``, ``EffectCancelled``), decided
by the processor. What happens before an outcome (an attempt running, a wait and its
reason, the next retry) is reported on the ``effects`` topic as one JSON record per
change, keyed ``tenant/effect_id``; the tracker folds both into the status store, so
``GET /v1/commands/{id}`` and ``keel effects`` show an effect's state. Reports are
ordered per effect by ``(generation, seq)``; an outcome of a generation outranks every
report of it.
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class EffectState(StrEnum):
    """Where an effect is: waiting for a worker, running, waiting on a guard, or settled."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


SETTLED = frozenset({EffectState.SUCCEEDED, EffectState.FAILED, EffectState.CANCELLED})


class WaitReason(StrEnum):
    """Why an effect (or the command that will have one) is not running now."""

    APPROVAL = "approval"
    """Its command is parked until an approver decides."""
    KILL_SWITCH = "kill_switch"
    """Its agent or command type is switched off; it runs when the switch is released."""
    BREAKER = "breaker"
    """Its provider's breaker is open; it runs when a probe succeeds."""
    BACKOFF = "backoff"
    """An attempt failed with a retryable error; ``next_attempt_at`` says when it runs again."""
    NO_HANDLER = "no_handler"
    """No running worker has a handler for its event type (a worker without the domain's package)."""


class EffectReport(BaseModel):
    """One change of an effect's state, as a worker reports it on the ``effects`` topic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant_id: str
    effect_id: uuid.UUID = Field(description="The id of the event the effect carries out.")
    origin_command_id: uuid.UUID = Field(description="The command whose event it is.")
    aggregate_id: str
    event_type: str
    provider: str
    generation: int = Field(ge=0)
    seq: int = Field(ge=0, description="Orders one worker's reports of one generation.")
    state: EffectState
    reason: WaitReason | None = None
    detail: str | None = Field(default=None, max_length=2000, description="The last error, or what it waits on.")
    attempts: int = Field(ge=0)
    next_attempt_at: float | None = Field(default=None, description="Unix time of the next attempt, in backoff.")
    at: float = Field(description="Unix time of the report.")
    worker: str

    @property
    def key(self) -> str:
        """The record key: one tenant's effect."""
        return f"{self.tenant_id}/{self.effect_id}"
