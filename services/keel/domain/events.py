"""Keel's own events: refusals, approvals and guardrails. Each class matches
``schemas/events/<Name>/v<N>.avsc``; a team's events live in its domain package."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from keel.domain.payloads import Event


class CommandRejected(Event):
    command_type: str
    code: str
    reason: str


class ApprovalKind(StrEnum):
    APPROVAL = "approval"  # by an actor holding an approver role in the tenant
    CONFIRMATION = "confirmation"  # by the on-behalf-of subject themself


class ApprovalRequested(Event):
    command_id: uuid.UUID
    command_type: str
    approval_kind: ApprovalKind
    policy_rule: str
    policy_version: str
    expires_at: datetime
    command: str


class ApprovalGranted(Event):
    command_id: uuid.UUID
    approver: str
    comment: str | None = None


class ApprovalRejected(Event):
    command_id: uuid.UUID
    approver: str
    reason: str


class ApprovalExpired(Event):
    command_id: uuid.UUID


class KillSwitchEngaged(Event):
    scope: str
    target: str
    reason: str


class KillSwitchReleased(Event):
    scope: str
    target: str
    reason: str


class BreakerTripped(Event):
    agent_id: str
    reason: str


class BreakerReset(Event):
    agent_id: str
    reason: str


class PolicyPublished(Event):
    policy_version: str
    document: str


class EffectSucceeded(Event):
    """The effect of event ``effect_id`` (caused by ``origin_command_id``) was performed."""

    effect_id: uuid.UUID
    origin_command_id: uuid.UUID
    generation: int
    provider: str
    attempts: int
    result: str


class EffectFailed(Event):
    effect_id: uuid.UUID
    origin_command_id: uuid.UUID
    generation: int
    provider: str
    attempts: int
    code: str
    error: str


class EffectCancelled(Event):
    effect_id: uuid.UUID
    origin_command_id: uuid.UUID
    generation: int
    code: str
    reason: str


class EffectRetried(Event):
    """A failed or cancelled effect runs again as ``generation``; its event is at
    ``event_partition``/``event_offset`` of the events topic."""

    effect_id: uuid.UUID
    origin_command_id: uuid.UUID
    generation: int
    reason: str
    event_partition: int
    event_offset: int


class ProviderBreakerOpened(Event):
    provider: str
    reason: str


class ProviderBreakerClosed(Event):
    provider: str
    reason: str
