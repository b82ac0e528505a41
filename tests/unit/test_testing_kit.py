"""``keel.testing``'s scenarios: they decide through Keel's side of ``decide``, branch without
interfering, and fail with messages that show what was expected and what happened."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from keel.domain.events import CommandRejected
from keel.domains.registry import current
from keel.testing import scenario
from keel.testing.scenario import parse_actor
from support_desk import domain
from support_desk.messages import (
    CancelSubscription,
    IssueRefund,
    RefundIssued,
    StartSubscription,
    SubscriptionCancelled,
    SubscriptionStarted,
)
from support_desk.subscription import INITIAL, Status, SubscriptionState

START = StartSubscription(customer_id="cust-1", plan="pro", monthly_price_cents=5000, currency="EUR")


def refund(amount: int) -> IssueRefund:
    return IssueRefund(amount_cents=amount, currency="EUR", reason="r")


def test_then_passes_on_equal_payloads_and_the_state_and_version_follow() -> None:
    after = scenario(domain).given(START).when(refund(100)).then(
        RefundIssued(amount_cents=100, currency="EUR", reason="r"))
    assert after.version == 2
    assert after.state(SubscriptionState).refunded_cents == 100
    [event] = after.decided.events
    assert (event.version, event.causation_id) == (2, after.decided.command.id)


def test_other_payloads_fail_with_expected_actual_and_the_fields_that_differ() -> None:
    refunded = scenario(domain, tenant="acme", aggregate="sub-9").given(START).when(refund(100))
    with pytest.raises(AssertionError) as failed:
        refunded.then(RefundIssued(amount_cents=200, currency="EUR", reason="r"))
    message = str(failed.value)
    assert message.startswith("then: IssueRefund on acme/sub-9 yielded other events than expected")
    assert re.search(r"expected:\n +RefundIssued\(amount_cents=200, currency='EUR', reason='r'\)", message)
    assert re.search(r"actual:\n +RefundIssued\(amount_cents=100, currency='EUR', reason='r'\)", message)
    assert "RefundIssued.amount_cents: expected 200, got 100" in message


def test_a_different_number_of_events_is_shown_whole() -> None:
    with pytest.raises(AssertionError, match=r"expected:\n +\(no events\)\n  actual:\n +SubscriptionStarted"):
        scenario(domain).when(START).then()


def test_then_on_a_rejected_command_shows_the_code_and_reason() -> None:
    with pytest.raises(AssertionError, match=r"was rejected \[refund_exceeds_paid\] refund of 9000 exceeds the "
                                             r"refundable 5000\n  expected:\n +RefundIssued"):
        scenario(domain).given(START).when(refund(9000)).then(RefundIssued(amount_cents=9000, currency="EUR",
                                                                           reason="r"))


def test_then_rejected_checks_the_code_of_the_domain_or_of_keel() -> None:
    started = scenario(domain).given(START)
    refused = started.when(refund(9000)).then_rejected("refund_exceeds_paid")
    assert isinstance(refused.decided.rejection, CommandRejected)
    assert refused.version == 1 and refused.decided.events[0].version is None
    started.when(CancelSubscription(reason="x"), expected_version=0).then_rejected("version_conflict")
    with pytest.raises(AssertionError, match=r"was rejected \[refund_exceeds_paid\] .*\n  expected code: nope"):
        started.when(refund(9000)).then_rejected("nope")
    with pytest.raises(AssertionError, match=r"was accepted, expected \[refund_exceeds_paid\]\n  actual:\n"
                                             r" +RefundIssued\(amount_cents=1,"):
        started.when(refund(1)).then_rejected("refund_exceeds_paid")


def test_steps_return_new_scenarios_so_one_history_branches() -> None:
    started = scenario(domain).given(START)
    started.when(CancelSubscription(reason="x")).then(SubscriptionCancelled(reason="x"))
    assert started.state(SubscriptionState).status is Status.ACTIVE
    assert started.version == 1 and len(started.history) == 1


def test_state_is_the_initial_before_any_event_and_checked_against_its_type() -> None:
    assert scenario(domain).state(SubscriptionState) is INITIAL
    with pytest.raises(AssertionError, match="tenant-1/aggregate-1 holds a SubscriptionState, not a int"):
        scenario(domain).given(START).state(int)


def test_given_events_fold_at_the_next_versions() -> None:
    given = scenario(domain).given(SubscriptionStarted(customer_id="c", plan="p", monthly_price_cents=1,
                                                       currency="EUR"))
    assert given.version == 1 and given.state(SubscriptionState).paid_cents == 1
    with pytest.raises(ValueError, match="CommandRejected is no event of a registered aggregate"):
        given.given(CommandRejected(command_type="X", code="c", reason="r"))


def test_a_refused_given_command_fails_the_setup_naming_it() -> None:
    with pytest.raises(AssertionError, match=r"given: CancelSubscription on tenant-1/aggregate-1 was rejected "
                                             r"\[unknown_aggregate\]"):
        scenario(domain).given(CancelSubscription(reason="x"))


def test_then_before_when_says_so() -> None:
    with pytest.raises(AssertionError, match=r"call when\(command\) before then"):
        scenario(domain).given(START).then()


def test_actors_are_kind_and_id() -> None:
    decided = scenario(domain).when(START, actor="human:jane.lead").decided
    assert (decided.command.actor.kind, decided.command.actor.id) == ("human", "jane.lead")
    with pytest.raises(ValueError, match="not kind:id"):
        parse_actor("robot:r2")


def test_a_domain_not_registered_in_the_process_decides_with_its_own_registry() -> None:
    unregistered = replace(domain, name="elsewhere")
    after = scenario(unregistered).given(START).when(refund(100)).then(
        RefundIssued(amount_cents=100, currency="EUR", reason="r"))
    assert after.registry is not current() and [d.name for d in after.registry.domains] == ["elsewhere"]
    assert scenario(domain).registry is current()