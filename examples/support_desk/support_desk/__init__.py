"""The support desk: agents start and cancel subscriptions, refund customers and e-mail them.

Refunds, their reversals and e-mails reach the outside world as effects (``support_desk.effects``).
Registered through the ``keel.domains`` entry point in this example's ``pyproject.toml``,
like any team's domain.
"""

from __future__ import annotations

from pathlib import Path

from keel.domains import ActorKind, Aggregate, Domain, Effect, Envelope, Match, Outcome, Rule, Undo

from support_desk import demo, effects, subscription
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

def reverse_refund(refund: Envelope, reason: str) -> ReverseRefund:
    """The compensation of a ``RefundIssued``: reverse the refund its command made."""
    if refund.causation_id is None:
        raise ValueError(f"refund event {refund.id} names no command to reverse")
    return ReverseRefund(refund_command_id=refund.causation_id, reason=reason)


subscriptions = Aggregate(
    name="subscription",
    initial=subscription.INITIAL,
    commands=(StartSubscription, CancelSubscription, IssueRefund, SendEmail, ReverseRefund,
              ReactivateSubscription),
    events=(SubscriptionStarted, SubscriptionCancelled, SubscriptionReactivated, RefundIssued, RefundReversed,
            EmailQueued),
    decide=subscription.decide,
    evolve=subscription.evolve,
)

domain = Domain(
    name="support_desk",
    home=Path(__file__).parent,
    aggregates=(subscriptions,),
    undo={
        RefundIssued: Undo(by=RefundReversed, names_undone="reverses", command=reverse_refund),
        SubscriptionCancelled: Undo(by=SubscriptionReactivated,
                                    command=lambda event, reason: ReactivateSubscription(reason=reason)),
    },
    policy=(
        # No large refund runs without an admin (a role nobody holds until the tenant grants it).
        Rule(name="refunds-over-1000-need-an-admin",
             match=Match(command_types=frozenset({"IssueRefund"}), payload={"amount_cents": {"gt": 100_000}}),
             decision=Outcome.APPROVE),
        # An agent unsure of a refund asks the customer.
        Rule(name="unsure-agents-ask-the-customer",
             match=Match(command_types=frozenset({"IssueRefund"}), actor_kinds=frozenset({ActorKind.AGENT}),
                         confidence_below=0.5),
             decision=Outcome.CONFIRM),
    ),
    views=("refund_totals",),
    effects=(
        Effect(on=RefundIssued, handler=effects.issue_refund, provider="payments"),
        Effect(on=RefundReversed, handler=effects.reverse_refund, provider="payments"),
        Effect(on=EmailQueued, handler=effects.send_email, provider="email"),
    ),
    demo=demo.demo,
    schema_namespace="keel",  # the namespace its schemas were first released under
)
