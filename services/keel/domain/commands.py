"""Keel's own commands, which every tenant has whatever its domains: approvals and guardrails.

Each class matches ``schemas/commands/<Name>/v<N>.avsc``. A team's commands live in its own
domain package (``keel.domains``).
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from pydantic import Field

from keel.domain.payloads import Command

_Reason = Field(min_length=1, max_length=1000)


class ApproveCommand(Command):
    command_id: uuid.UUID
    comment: str | None = Field(default=None, max_length=1000)


class RejectCommand(Command):
    command_id: uuid.UUID
    reason: str = _Reason


class ExpireApproval(Command):
    command_id: uuid.UUID


class SwitchScope(StrEnum):
    AGENT = "agent"
    COMMAND_TYPE = "command_type"


class SetKillSwitch(Command):
    scope: SwitchScope
    target: str = Field(min_length=1, max_length=200)
    engaged: bool
    reason: str = _Reason


class TripBreaker(Command):
    agent_id: str = Field(min_length=1, max_length=200)
    reason: str = _Reason


class ResetBreaker(Command):
    agent_id: str = Field(min_length=1, max_length=200)
    reason: str = _Reason


class SetPolicy(Command):
    document: str = Field(min_length=2, max_length=1_000_000)


_Provider = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class CompleteEffect(Command):
    """Sent by an effect worker: the effect's handler succeeded (``result`` is JSON text)."""

    effect_id: uuid.UUID
    generation: int = Field(ge=0)
    provider: str = _Provider
    attempts: int = Field(ge=1)
    result: str = Field(max_length=100_000)


class FailEffect(Command):
    """Sent by an effect worker: the effect failed for good (a permanent error, or no attempts left)."""

    effect_id: uuid.UUID
    generation: int = Field(ge=0)
    provider: str = _Provider
    attempts: int = Field(ge=0)
    code: str = Field(min_length=1, max_length=100)
    error: str = Field(max_length=10_000)


class CancelEffect(Command):
    """The effect must not run: undone meanwhile, or cancelled by an operator (``code`` says which)."""

    effect_id: uuid.UUID
    code: str = Field(min_length=1, max_length=100)
    reason: str = _Reason


class RetryEffect(Command):
    """Run a failed or cancelled effect again, under the same idempotency key.

    ``event_partition`` and ``event_offset`` locate the effect's event in the events topic
    (``keel effects retry`` finds them); the worker that runs the retry reads the event there
    and checks that its id is ``effect_id``.
    """

    effect_id: uuid.UUID
    reason: str = _Reason
    event_partition: int = Field(ge=0)
    event_offset: int = Field(ge=0)


class OpenProviderBreaker(Command):
    """Sent by an effect worker: a provider failed repeatedly; its effects wait instead of calling it."""

    provider: str = _Provider
    reason: str = _Reason


class CloseProviderBreaker(Command):
    """A probe through an open breaker succeeded (or an operator closed it): the provider's effects run again."""

    provider: str = _Provider
    reason: str = _Reason
