"""The subscription aggregate's rules, decided the way Keel's processor decides them (``keel.testing``),
and one story through the real broker and processor, the domain's default policy included."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from keel.domain.envelope import Envelope
from keel.domain.outcomes import event_id
from keel.testing import Scenario, scenario
from keel.testing.pipeline import Pipeline

from support_desk import domain
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
from support_desk.subscription import Status, SubscriptionState

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
START = StartSubscription(customer_id="cust-1", plan="pro", monthly_price_cents=5000, currency="EUR")
STARTED = SubscriptionStarted(customer_id="cust-1", plan="pro", monthly_price_cents=5000, currency="EUR")


def refund(amount: int, currency: str = "EUR", reason: str = "half") -> IssueRefund:
    return IssueRefund(amount_cents=amount, currency=currency, reason=reason)


def desk() -> Scenario:
    """An empty history of acme's sub-1, acted on by the support agent."""
    return scenario(domain, tenant="acme", aggregate="sub-1", actor="agent:support-bot", now=NOW)


def test_start_opens_an_active_subscription_at_version_1() -> None:
    started = desk().when(START).then(STARTED)
    assert started.version == 1
    assert started.state(SubscriptionState) == SubscriptionState(
        status=Status.ACTIVE, customer_id="cust-1", plan="pro", currency="EUR", paid_cents=5000)


def test_the_support_story_cancels_refunds_and_queues_an_email() -> None:
    story = (desk().given(START)
             .when(CancelSubscription(reason="asked")).then(SubscriptionCancelled(reason="asked"))
             .when(refund(2000)).then(RefundIssued(amount_cents=2000, currency="EUR", reason="half"))
             .when(SendEmail(to_address="ada@example.com", template="bye"))
             .then(EmailQueued(to_address="ada@example.com", template="bye")))
    assert [(e.type, e.version) for e in story.history] == [
        ("SubscriptionStarted", 1), ("SubscriptionCancelled", 2), ("RefundIssued", 3), ("EmailQueued", 4)]
    state = story.state(SubscriptionState)
    assert (state.status, state.refunded_cents, state.emails_queued, story.version) == (Status.CANCELLED, 2000, 1, 4)


@pytest.mark.parametrize(("history", "command", "code"), [
    ((), CancelSubscription(reason="x"), "unknown_aggregate"),
    ((START,), START, "already_exists"),
    ((START, CancelSubscription(reason="x")), CancelSubscription(reason="again"), "invalid_state"),
    ((START,), refund(5001, reason="too much"), "refund_exceeds_paid"),
    ((START, refund(3000, reason="a")), refund(3000, reason="b"), "refund_exceeds_paid"),
    ((START,), refund(100, currency="USD"), "currency_mismatch"),
    ((START,), ReactivateSubscription(reason="not cancelled"), "invalid_state"),
])
def test_invalid_commands_are_rejected_with_a_code_and_leave_state_unchanged(
        history: tuple[StartSubscription | CancelSubscription | IssueRefund, ...],
        command: StartSubscription | CancelSubscription | IssueRefund | ReactivateSubscription, code: str) -> None:
    before = desk().given(*history)
    after = before.when(command).then_rejected(code)
    [rejection] = after.decided.events
    assert rejection.version is None
    assert (after.version, after.state(SubscriptionState)) == (before.version, before.state(SubscriptionState))


def test_a_refund_is_undone_by_its_compensation_once() -> None:
    refunded = desk().given(START).when(refund(2000))
    refund_id = refunded.decided.command.id
    undone = (refunded.when(ReverseRefund(refund_command_id=refund_id, reason="customer disputes"))
              .then(RefundReversed(amount_cents=2000, currency="EUR", reason="customer disputes", reverses=refund_id)))
    state = undone.state(SubscriptionState)
    assert (state.refunded_cents, state.refunds) == (0, {})
    undone.when(ReverseRefund(refund_command_id=refund_id, reason="twice")).then_rejected("nothing_to_reverse")


def test_a_cancellation_is_undone_by_reactivation() -> None:
    reactivated = (desk().given(START, CancelSubscription(reason="asked"))
                   .when(ReactivateSubscription(reason="mistake")).then(SubscriptionReactivated(reason="mistake")))
    assert reactivated.state(SubscriptionState).status is Status.ACTIVE


def test_given_events_fold_like_decided_ones() -> None:
    from_events = desk().given(STARTED, RefundIssued(amount_cents=1000, currency="EUR", reason="x"))
    from_commands = desk().given(START, refund(1000, reason="x"))
    assert from_events.version == from_commands.version == 2
    assert from_events.state(SubscriptionState).refunded_cents == 1000
    from_events.when(refund(4001)).then_rejected("refund_exceeds_paid")


def test_a_stale_expected_version_is_rejected_by_keel() -> None:
    started = desk().given(START)
    started.when(CancelSubscription(reason="x"), expected_version=0).then_rejected("version_conflict")
    started.when(CancelSubscription(reason="x"), expected_version=1).then(SubscriptionCancelled(reason="x"))


def test_event_ids_are_deterministic_per_command_and_index() -> None:
    command_id = uuid.uuid4()
    first = desk().when(START, command_id=command_id).decided
    again = scenario(domain, now=NOW + timedelta(days=1)).when(START, command_id=command_id).decided
    assert [e.id for e in first.events] == [e.id for e in again.events] == [event_id(command_id, 0)]


def test_events_inherit_attribution_and_point_at_their_command() -> None:
    decided = desk().when(START, on_behalf_of="cust-1").decided
    [event] = decided.events
    assert (event.actor.kind, event.actor.id, event.on_behalf_of, event.tenant_id) == (
        "agent", "support-bot", "cust-1", "acme")
    assert (event.causation_id, event.correlation_id) == (decided.command.id, decided.command.correlation_id)


@pytest.mark.integration
def test_a_refund_story_through_the_real_processor_parks_a_large_refund_for_an_admin(
        keel_pipeline: Pipeline) -> None:
    def command(payload: StartSubscription | IssueRefund | SendEmail, actor: str | None = None) -> Envelope:
        return keel_pipeline.command(payload, aggregate="sub-1", actor=actor, on_behalf_of="cust-1")

    started, refunded, refused, parked, emailed = keel_pipeline.run(
        command(StartSubscription(customer_id="cust-1", plan="pro", monthly_price_cents=50_000, currency="EUR"),
                actor="service:billing"),
        command(refund(2000)),
        command(refund(60_000)),
        command(refund(150_000)),  # over 1,000.00: the domain's default policy asks an admin before decide runs
        command(SendEmail(to_address="ada@example.com", template="refunded")),
    )

    assert started.payloads == [SubscriptionStarted(customer_id="cust-1", plan="pro", monthly_price_cents=50_000,
                                                    currency="EUR")]
    assert refunded.payloads == [RefundIssued(amount_cents=2000, currency="EUR", reason="half")]
    assert refused.rejection is not None and refused.rejection.code == "refund_exceeds_paid"
    [request] = parked.events
    assert (request.type, request.authority.policy_rule) == ("ApprovalRequested", "refunds-over-1000-need-an-admin")
    # The e-mail address travelled sealed; it comes back opened with the data subject's key.
    assert emailed.payloads == [EmailQueued(to_address="ada@example.com", template="refunded")]
    assert [e.version for d in (started, refunded, refused, parked, emailed) for e in d.events] == [1, 2, None, 3, 4]
