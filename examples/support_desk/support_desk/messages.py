"""The support desk's commands and events: a support agent managing a subscription.

Each class matches ``schemas/{commands,events}/<Name>/v<N>.avsc`` (``keel schemas check``
proves it); fields typed ``EmailAddress`` or ``PersonalText`` hold the data subject's
personal data and are sealed under the subject's key.
"""

from __future__ import annotations

import uuid

from pydantic import Field

from keel.domains import Command, EmailAddress, Event, PersonalText

_Currency = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")
_Reason = Field(min_length=1, max_length=1000)


class StartSubscription(Command):
    """Start a subscription for a customer."""

    customer_id: str = Field(min_length=1, max_length=200)
    plan: str = Field(min_length=1, max_length=100)
    monthly_price_cents: int = Field(ge=0, le=10**12)
    currency: str = _Currency


class CancelSubscription(Command):
    """Cancel the subscription."""

    reason: str = _Reason


class IssueRefund(Command):
    """Refund part or all of what the customer paid."""

    amount_cents: int = Field(gt=0, le=10**12)
    currency: str = _Currency
    reason: str = _Reason
    confidence: float | None = Field(default=None, ge=0.0, le=1.0,
                                     description="The agent's self-reported confidence, 0..1.")


class SendEmail(Command):
    """Queue a follow-up email to the customer (an effect intent)."""

    to_address: EmailAddress
    template: str = Field(min_length=1, max_length=100)
    body: PersonalText | None = None


class ReverseRefund(Command):
    """Undo a refund: the compensation of IssueRefund."""

    refund_command_id: uuid.UUID
    reason: str = _Reason


class ReactivateSubscription(Command):
    """Undo a cancellation: the compensation of CancelSubscription."""

    reason: str = _Reason


class SubscriptionStarted(Event):
    customer_id: str
    plan: str
    monthly_price_cents: int
    currency: str


class SubscriptionCancelled(Event):
    reason: str


class SubscriptionReactivated(Event):
    reason: str


class RefundIssued(Event):
    amount_cents: int
    currency: str
    reason: str


class RefundReversed(Event):
    amount_cents: int
    currency: str
    reason: str
    reverses: uuid.UUID


class EmailQueued(Event):
    to_address: EmailAddress
    template: str
    body: PersonalText | None = None
