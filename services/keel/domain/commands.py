"""Commands: the reference domain's (a support agent managing a subscription), and the
governance commands every tenant has (approvals, compensation, guardrails, policy).

Each class matches ``schemas/commands/<Name>/v<N>.avsc``; fields marked personal there
hold the data subject's personal data.
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from pydantic import Field

from keel.domain.payloads import Command
from keel.domain.personal import EmailAddress, PersonalText

_Currency = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")
_Reason = Field(min_length=1, max_length=1000)


class StartSubscription(Command):
    customer_id: str = Field(min_length=1, max_length=200)
    plan: str = Field(min_length=1, max_length=100)
    monthly_price_cents: int = Field(ge=0, le=10**12)
    currency: str = _Currency


class CancelSubscription(Command):
    reason: str = _Reason


class IssueRefund(Command):
    amount_cents: int = Field(gt=0, le=10**12)
    currency: str = _Currency
    reason: str = _Reason
    confidence: float | None = Field(default=None, ge=0.0, le=1.0,
                                     description="The agent's self-reported confidence.")


class SendEmail(Command):
    to_address: EmailAddress
    template: str = Field(min_length=1, max_length=100)
    body: PersonalText | None = None


class ReverseRefund(Command):
    refund_command_id: uuid.UUID
    reason: str = _Reason


class ReactivateSubscription(Command):
    reason: str = _Reason


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
