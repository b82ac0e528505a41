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
