"""Payloads of the reference domain: a support agent that manages a customer's subscription.

The story Keel exists for: an agent cancels a subscription, issues a refund and sends
follow-up emails; later the customer says they never authorised any of it. Each class
here matches ``schemas/<kind>s/<Name>/v<N>.avsc``. Fields marked personal in the schema
hold the data subject's personal data.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from keel.domain.envelope import Payload
from keel.errors import UnknownMessageType

_Currency = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")


class Command(Payload):
    kind: ClassVar[Literal["command", "event"]] = "command"


class Event(Payload):
    kind: ClassVar[Literal["command", "event"]] = "event"


# -- commands ---------------------------------------------------------------------------


class StartSubscription(Command):
    customer_id: str = Field(min_length=1, max_length=200)
    plan: str = Field(min_length=1, max_length=100)
    monthly_price_cents: int = Field(ge=0, le=10**12)
    currency: str = _Currency


class CancelSubscription(Command):
    reason: str = Field(min_length=1, max_length=1000)


class IssueRefund(Command):
    amount_cents: int = Field(gt=0, le=10**12)
    currency: str = _Currency
    reason: str = Field(min_length=1, max_length=1000)
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)


class SendEmail(Command):
    to_address: str = Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)
    template: str = Field(min_length=1, max_length=100)
    body: str | None = Field(default=None, max_length=100_000)


# -- events -----------------------------------------------------------------------------


class SubscriptionStarted(Event):
    customer_id: str
    plan: str
    monthly_price_cents: int
    currency: str


class SubscriptionCancelled(Event):
    reason: str


class RefundIssued(Event):
    amount_cents: int
    currency: str
    reason: str


class EmailQueued(Event):
    to_address: str
    template: str
    body: str | None = None


class CommandRejected(Event):
    command_type: str
    code: str
    reason: str


PAYLOADS: dict[str, type[Payload]] = {
    cls.__name__: cls
    for cls in (
        StartSubscription, CancelSubscription, IssueRefund, SendEmail,
        SubscriptionStarted, SubscriptionCancelled, RefundIssued, EmailQueued, CommandRejected,
    )
}


def payload_class(message_type: str) -> type[Payload]:
    """The payload class registered for ``message_type``."""
    try:
        return PAYLOADS[message_type]
    except KeyError:
        raise UnknownMessageType(
            f"unknown message type {message_type!r}; known: {', '.join(sorted(PAYLOADS))}",
            field="type",
        ) from None
