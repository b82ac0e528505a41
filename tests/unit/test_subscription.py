"""The subscription aggregate's pure decide/evolve rules."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import reduce

import pytest

from keel.domain.envelope import Actor, ActorKind, Envelope, new_command
from keel.domain.messages import (
    CancelSubscription,
    CommandRejected,
    EmailQueued,
    IssueRefund,
    ReactivateSubscription,
    RefundIssued,
    RefundReversed,
    ReverseRefund,
    SendEmail,
    StartSubscription,
    SubscriptionCancelled,
    SubscriptionStarted,
)
from keel.domain.envelope import Payload
from keel.domain.outcomes import event_id, to_events
from keel.domain.subscription import INITIAL, Status, SubscriptionState, decide, evolve

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def command(payload: Payload, **kwargs: object) -> Envelope:
    return new_command(payload, tenant_id="acme", aggregate_id="sub-1", actor=AGENT, **kwargs)  # type: ignore[arg-type]


def run(*payloads: Payload) -> tuple[SubscriptionState, list[Envelope]]:
    """Decide and fold each command in turn, as the processor does."""
    states, history = run_states(*payloads)
    return states[-1], history


def run_states(*payloads: Payload) -> tuple[list[SubscriptionState], list[Envelope]]:
    """Like ``run``, keeping the state after every command."""
    states, history = [INITIAL], []
    for payload in payloads:
        cmd = command(payload)
        events = to_events(cmd, decide(cmd, states[-1]), version=states[-1].version, now=NOW)
        states.append(reduce(evolve, events, states[-1]))
        history.extend(events)
    return states, history


START = StartSubscription(customer_id="cust-1", plan="pro", monthly_price_cents=5000, currency="EUR")


def test_start_opens_an_active_subscription_at_version_1() -> None:
    state, events = run(START)
    assert [type(e.payload) for e in events] == [SubscriptionStarted]
    assert state == SubscriptionState(version=1, status=Status.ACTIVE, customer_id="cust-1", plan="pro",
                                      currency="EUR", paid_cents=5000)


def test_the_support_story_cancels_refunds_and_queues_an_email() -> None:
    state, events = run(START, CancelSubscription(reason="asked"),
                        IssueRefund(amount_cents=2000, currency="EUR", reason="half"),
                        SendEmail(to_address="ada@example.com", template="bye"))
    assert [type(e.payload) for e in events] == [SubscriptionStarted, SubscriptionCancelled,
                                                 RefundIssued, EmailQueued]
    assert [e.version for e in events] == [1, 2, 3, 4]
    assert (state.status, state.refunded_cents, state.emails_queued, state.version) == (
        Status.CANCELLED, 2000, 1, 4)


@pytest.mark.parametrize(("payloads", "code"), [
    ((CancelSubscription(reason="x"),), "unknown_aggregate"),
    ((START, START), "already_exists"),
    ((START, CancelSubscription(reason="x"), CancelSubscription(reason="again")), "invalid_state"),
    ((START, IssueRefund(amount_cents=5001, currency="EUR", reason="too much")), "refund_exceeds_paid"),
    ((START, IssueRefund(amount_cents=3000, currency="EUR", reason="a"),
      IssueRefund(amount_cents=3000, currency="EUR", reason="b")), "refund_exceeds_paid"),
    ((START, IssueRefund(amount_cents=100, currency="USD", reason="x")), "currency_mismatch"),
])
def test_invalid_commands_are_rejected_with_a_code_and_leave_state_unchanged(
        payloads: tuple[Payload, ...], code: str) -> None:
    states, events = run_states(*payloads)
    before, after = states[-2], states[-1]
    rejection = events[-1]
    assert isinstance(rejection.payload, CommandRejected)
    assert rejection.payload.code == code
    assert rejection.version is None
    assert after == before


def test_a_refund_is_undone_by_its_compensation_once() -> None:
    states, events = run_states(START, IssueRefund(amount_cents=2000, currency="EUR", reason="half"))
    refund_command_id = events[-1].causation_id
    assert refund_command_id is not None
    undo = command(ReverseRefund(refund_command_id=refund_command_id, reason="customer disputes"))
    [reversal] = decide(undo, states[-1])
    assert isinstance(reversal, RefundReversed)
    assert (reversal.amount_cents, reversal.reverses) == (2000, refund_command_id)
    [reversed_event] = to_events(undo, [reversal], version=states[-1].version, now=NOW)
    after = evolve(states[-1], reversed_event)
    assert (after.refunded_cents, after.refunds) == (0, {})
    [again] = decide(command(ReverseRefund(refund_command_id=refund_command_id, reason="twice")), after)
    assert isinstance(again, CommandRejected) and again.code == "nothing_to_reverse"


def test_a_cancellation_is_undone_by_reactivation() -> None:
    state, _ = run(START, CancelSubscription(reason="asked"), ReactivateSubscription(reason="mistake"))
    assert state.status is Status.ACTIVE


def test_stale_expected_version_is_rejected() -> None:
    state, _ = run(START)
    stale = command(CancelSubscription(reason="x"), expected_version=0)
    [rejection] = decide(stale, state)
    assert isinstance(rejection, CommandRejected) and rejection.code == "version_conflict"
    fresh = command(CancelSubscription(reason="x"), expected_version=1)
    assert isinstance(decide(fresh, state)[0], SubscriptionCancelled)


def test_event_ids_are_deterministic_per_command_and_index() -> None:
    cmd = command(START)
    first = to_events(cmd, decide(cmd, INITIAL), version=0, now=NOW)
    again = to_events(cmd, decide(cmd, INITIAL), version=0, now=datetime.now(UTC))
    assert [e.id for e in first] == [e.id for e in again] == [event_id(cmd.id, 0)]
    assert event_id(cmd.id, 0) != event_id(cmd.id, 1)


def test_events_inherit_attribution_and_point_at_their_command() -> None:
    cmd = command(START, on_behalf_of="cust-1")
    [event] = to_events(cmd, decide(cmd, INITIAL), version=0, now=NOW)
    assert (event.actor, event.on_behalf_of, event.tenant_id) == (AGENT, "cust-1", "acme")
    assert (event.causation_id, event.correlation_id) == (cmd.id, cmd.correlation_id)
