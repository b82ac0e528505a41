"""The subscription aggregate as pure functions: ``decide(state, command)`` and ``evolve``.

No I/O, no clocks, no Kafka: Keel folds a subscription's events with ``evolve`` to get its
state, asks ``decide`` what a command yields, and publishes that. Versions, expected-version
checks and approvals are Keel's; this module holds only the business rules.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from enum import StrEnum

from keel.domains import Envelope, Event, Rejected

from support_desk.messages import (
    CancelSubscription,
    EmailQueued,
    IssueRefund,
    ReactivateSubscription,
    RefundIssued,
    RefundReversed,
    ReverseRefund,
    SendEmail,
    StartSubscription,
    SubscriptionCancelled,
    SubscriptionReactivated,
    SubscriptionStarted,
)


class Status(StrEnum):
    NONE = "none"
    ACTIVE = "active"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SubscriptionState:
    """What the system knew about one subscription."""

    status: Status = Status.NONE
    customer_id: str | None = None
    plan: str | None = None
    currency: str | None = None
    paid_cents: int = 0
    refunded_cents: int = 0
    emails_queued: int = 0
    refunds: dict[uuid.UUID, int] = field(default_factory=dict)
    """Refunds still standing, by the IssueRefund command id (what compensation can undo)."""


INITIAL = SubscriptionState()


def decide(state: SubscriptionState, command: Envelope) -> list[Event]:
    """What ``command`` yields against ``state``; raises ``Rejected`` to refuse it."""
    match command.payload:
        case StartSubscription() as start:
            if state.status is not Status.NONE:
                raise Rejected("already_exists", f"subscription {command.aggregate_id} exists")
            return [SubscriptionStarted(customer_id=start.customer_id, plan=start.plan,
                                        monthly_price_cents=start.monthly_price_cents, currency=start.currency)]
        case _ if state.status is Status.NONE:
            raise Rejected("unknown_aggregate", f"no subscription {command.aggregate_id}")
        case CancelSubscription() as cancel:
            if state.status is Status.CANCELLED:
                raise Rejected("invalid_state", "the subscription is already cancelled")
            return [SubscriptionCancelled(reason=cancel.reason)]
        case IssueRefund() as refund:
            if refund.currency != state.currency:
                raise Rejected("currency_mismatch",
                               f"refund in {refund.currency}, subscription bills in {state.currency}")
            refundable = state.paid_cents - state.refunded_cents
            if refund.amount_cents > refundable:
                raise Rejected("refund_exceeds_paid",
                               f"refund of {refund.amount_cents} exceeds the refundable {refundable}")
            return [RefundIssued(amount_cents=refund.amount_cents, currency=refund.currency, reason=refund.reason)]
        case SendEmail() as email:
            return [EmailQueued(to_address=email.to_address, template=email.template, body=email.body)]
        case ReverseRefund() as undo:
            amount = state.refunds.get(undo.refund_command_id)
            if amount is None:
                raise Rejected("nothing_to_reverse",
                               f"no standing refund from command {undo.refund_command_id} on this subscription")
            return [RefundReversed(amount_cents=amount, currency=state.currency or "", reason=undo.reason,
                                   reverses=undo.refund_command_id)]
        case ReactivateSubscription() as reactivate:
            if state.status is not Status.CANCELLED:
                raise Rejected("invalid_state", "only a cancelled subscription can be reactivated")
            return [SubscriptionReactivated(reason=reactivate.reason)]
    raise Rejected("unsupported_command", f"{command.type} is not a subscription command")


def evolve(state: SubscriptionState, event: Envelope) -> SubscriptionState:
    """The state after ``event``."""
    match event.payload:
        case SubscriptionStarted() as started:
            return replace(state, status=Status.ACTIVE, customer_id=started.customer_id, plan=started.plan,
                           currency=started.currency, paid_cents=started.monthly_price_cents)
        case SubscriptionCancelled():
            return replace(state, status=Status.CANCELLED)
        case RefundIssued() as refund:
            refunds = dict(state.refunds)
            if event.causation_id is not None:
                refunds[event.causation_id] = refund.amount_cents
            return replace(state, refunded_cents=state.refunded_cents + refund.amount_cents, refunds=refunds)
        case RefundReversed() as reversal:
            return replace(state, refunded_cents=state.refunded_cents - reversal.amount_cents,
                           refunds={k: v for k, v in state.refunds.items() if k != reversal.reverses})
        case SubscriptionReactivated():
            return replace(state, status=Status.ACTIVE)
        case EmailQueued():
            return replace(state, emails_queued=state.emails_queued + 1)
    return state
