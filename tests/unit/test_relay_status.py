"""How events and dead letters become command statuses (the approval events included)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from functools import reduce
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from keel.domain.aggregate import EMPTY, AggregateState, evolve_aggregate
from keel.domain.envelope import Actor, ActorKind, Envelope, Payload
from keel.contracts.codec import EnvelopeCodec
from keel.domain.events import (
    ApprovalExpired,
    ApprovalGranted,
    ApprovalKind,
    ApprovalRejected,
    ApprovalRequested,
    EffectSucceeded,
)
from keel.domain.governance.controls import TenantControls
from keel.domain.governance.pipeline import Context, govern
from keel.domain.governance.policy import parse_policy
from keel.domain.governance.ratelimit import RateLimiter
from keel.domain.messages import ApproveCommand, CommandRejected, Event, ExpireApproval, RejectCommand
from support_desk.messages import ReverseRefund, SubscriptionStarted
from keel.outbox.models import CommandStatus, Outcome, RecordedEvent, TrackedEvent
from keel.outbox.store import payload_text
from keel.relay.status import dead_letter_outcome, event_outcomes, iso_text, recorded_outcomes
from tests.helpers import AGENT, command, refund, start

ADMIN = Actor(kind=ActorKind.HUMAN, id="jane.lead")
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
POLICY = {
    "version": "v1",
    "roles": {"support-agent": ["*"], "admin": ["*"]},
    "grants": {"agent:support-bot": ["support-agent"], "human:jane.lead": ["admin"]},
    "rules": [{"name": "big-refunds-need-admin",
               "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}},
               "decision": "approve"}],
    "approval_ttl_seconds": 3600,
}


def event(payload: Event, causation: uuid.UUID | None) -> Envelope:
    return Envelope(id=uuid.uuid4(), tenant_id="acme", actor=AGENT, type=type(payload).__name__,
                    aggregate_id="sub-1", causation_id=causation, correlation_id=uuid.uuid4(),
                    occurred_at=datetime.now(UTC), payload=payload)


def only(event: Envelope) -> Outcome:
    [outcome] = event_outcomes(event)
    return outcome


class Aggregate:
    """One subscription under POLICY, decided by the real governance pipeline."""

    def __init__(self) -> None:
        self.controls = TenantControls()
        self.controls.policy = parse_policy(json.dumps(POLICY))
        self.limiter, self.now = RateLimiter(), NOW
        self.state: AggregateState = EMPTY
        self.send(command("acme", "sub-1", start(500_000)))

    def send(self, sent: Envelope) -> list[Envelope]:
        decision = govern(sent, self.state, Context(self.controls, self.limiter, self.now))
        self.state = reduce(evolve_aggregate, decision.events, self.state)
        return decision.events

    def outcomes(self, payload: Payload, actor: Actor = ADMIN) -> tuple[Envelope, list[Outcome]]:
        sent = command("acme", "sub-1", payload, actor=actor)
        return sent, [o for e in self.send(sent) for o in event_outcomes(e)]


def test_an_effect_event_marks_its_command_executed_and_is_kept() -> None:
    cause = uuid.uuid4()
    outcome = only(event(SubscriptionStarted(customer_id="c", plan="p", monthly_price_cents=1, currency="EUR"),
                         cause))
    assert outcome.command_id == cause and outcome.status is CommandStatus.EXECUTED
    assert isinstance(outcome.event, TrackedEvent) and outcome.event.payload["plan"] == "p"
    assert (outcome.reason_code, outcome.reason, outcome.subject_command_id) == (None, None, None)


def test_a_rejection_carries_the_processors_code_and_reason() -> None:
    outcome = only(event(CommandRejected(command_type="IssueRefund", code="too_much", reason="no"), uuid.uuid4()))
    assert (outcome.status, outcome.reason_code, outcome.reason) == (CommandStatus.REJECTED, "too_much", "no")


def test_an_approval_request_parks_the_command_that_caused_it() -> None:
    waiting = uuid.uuid4()
    outcome = only(event(ApprovalRequested(command_id=waiting, command_type="IssueRefund",
                                           approval_kind=ApprovalKind.APPROVAL, policy_rule="r", policy_version="v",
                                           expires_at=NOW, command="{}"), waiting))
    assert (outcome.command_id, outcome.status) == (waiting, CommandStatus.PENDING_APPROVAL)


def test_approval_events_give_the_parked_command_its_outcome_and_the_approving_one_executed() -> None:
    waiting, approving = uuid.uuid4(), uuid.uuid4()
    parked, approver = event_outcomes(event(ApprovalGranted(command_id=waiting, approver="human:jane"), approving))
    assert (parked.command_id, parked.status) == (waiting, None) and parked.event is not None
    assert (approver.command_id, approver.status, approver.subject_command_id) == (
        approving, CommandStatus.EXECUTED, waiting)
    assert approver.reason == f"command {waiting} approved by human:jane"
    assert approver.reason_code is None and approver.event is None  # the event stays on the parked command's trail

    parked, rejecter = event_outcomes(event(ApprovalRejected(command_id=waiting, approver="human:jane",
                                                             reason="risky"), approving))
    assert (parked.status, parked.reason_code, parked.reason) == (CommandStatus.REJECTED, "approval_rejected", "risky")
    assert (rejecter.status, rejecter.subject_command_id) == (CommandStatus.EXECUTED, waiting)
    assert rejecter.reason == f"command {waiting} rejected by human:jane: risky"

    parked, expirer = event_outcomes(event(ApprovalExpired(command_id=waiting), approving))
    assert (parked.status, parked.reason_code) == (CommandStatus.REJECTED, "approval_expired")
    assert (expirer.status, expirer.subject_command_id) == (CommandStatus.EXECUTED, waiting)
    assert expirer.reason == f"command {waiting}'s approval expired; it will not run"


def test_an_approval_event_without_a_cause_only_names_the_parked_command() -> None:
    waiting = uuid.uuid4()
    assert only(event(ApprovalGranted(command_id=waiting, approver="human:jane"), None)).command_id == waiting


def test_a_compensation_is_executed_and_names_what_it_undid() -> None:
    parked = Aggregate()
    issued = command("acme", "sub-1", refund(700))
    parked.send(issued)
    undo, [outcome] = parked.outcomes(ReverseRefund(refund_command_id=issued.id, reason="disputed"))
    assert (outcome.command_id, outcome.status, outcome.subject_command_id) == (
        undo.id, CommandStatus.EXECUTED, issued.id)
    assert outcome.reason == f"command {issued.id} undone: disputed"
    assert isinstance(outcome.event, TrackedEvent) and outcome.event.payload["reverses"] == str(issued.id)


def test_every_command_of_an_approval_through_the_pipeline_reaches_a_final_status() -> None:
    """The events the governance pipeline really emits: approver and parked command both end."""
    aggregate = Aggregate()
    big, refused = command("acme", "sub-1", refund(150_000)), command("acme", "sub-1", refund(120_000))
    assert [(o.command_id, o.status) for e in aggregate.send(big) for o in event_outcomes(e)] == [
        (big.id, CommandStatus.PENDING_APPROVAL)]
    aggregate.send(refused)

    own, [self_approval] = aggregate.outcomes(ApproveCommand(command_id=big.id), actor=AGENT)
    assert (self_approval.command_id, self_approval.status, self_approval.reason_code) == (
        own.id, CommandStatus.REJECTED, "self_approval")

    approve, outcomes = aggregate.outcomes(ApproveCommand(command_id=big.id, comment="ok"))
    assert [(o.command_id, o.status, o.event and o.event.type) for o in outcomes] == [
        (big.id, None, "ApprovalGranted"), (approve.id, CommandStatus.EXECUTED, None),
        (big.id, CommandStatus.EXECUTED, "RefundIssued")]
    assert outcomes[1].reason == f"command {big.id} approved by human:jane.lead"

    again, [not_pending] = aggregate.outcomes(ApproveCommand(command_id=big.id))
    assert (not_pending.command_id, not_pending.status, not_pending.reason_code) == (
        again.id, CommandStatus.REJECTED, "not_pending")

    reject, outcomes = aggregate.outcomes(RejectCommand(command_id=refused.id, reason="too much"))
    assert [(o.command_id, o.status, o.reason_code) for o in outcomes] == [
        (refused.id, CommandStatus.REJECTED, "approval_rejected"), (reject.id, CommandStatus.EXECUTED, None)]

    late = command("acme", "sub-1", refund(130_000))
    aggregate.send(late)
    aggregate.now += timedelta(hours=2)
    expire, outcomes = aggregate.outcomes(ExpireApproval(command_id=late.id))
    assert [(o.command_id, o.status, o.subject_command_id) for o in outcomes] == [
        (late.id, CommandStatus.REJECTED, None), (expire.id, CommandStatus.EXECUTED, late.id)]


def test_an_approval_whose_resume_is_refused_rejects_the_parked_command_and_says_so() -> None:
    aggregate = Aggregate()
    big = command("acme", "sub-1", refund(150_000))
    aggregate.send(big)
    aggregate.controls.killed_agents.add("support-bot")  # switched off while it waited
    approve, [parked, approver] = aggregate.outcomes(ApproveCommand(command_id=big.id))
    assert (parked.command_id, parked.status, parked.reason_code) == (
        big.id, CommandStatus.REJECTED, "approval_rejected")
    assert (approver.command_id, approver.status, approver.subject_command_id) == (
        approve.id, CommandStatus.EXECUTED, big.id)
    assert approver.reason is not None and approver.reason.startswith(f"command {big.id} rejected by keel: ")
    assert "kill_switch" in approver.reason


def test_an_event_that_names_no_command_changes_nothing() -> None:
    assert event_outcomes(event(CommandRejected(command_type="X", code="c", reason="r"), None)) == []


def recorded(event: Envelope) -> list[Outcome] | None:
    """``recorded_outcomes`` of ``event`` as the tracker reads it from the events topic."""
    data = CODEC.encode(event)
    return recorded_outcomes(CODEC.read(data), data)


CODEC = EnvelopeCodec()


def test_an_event_read_from_its_record_ends_its_command_as_its_validated_envelope_does() -> None:
    """The tracker's path without a payload model learns what ``event_outcomes`` learns, and keeps the
    event's record for the trail; each event that names another command is left to the full path."""
    aggregate = Aggregate()
    done, big, refused = command("acme", "sub-1", refund(700)), command("acme", "sub-1", refund(150_000)), command(
        "acme", "sub-1", start())  # started already
    plain = aggregate.send(done) + aggregate.send(refused)
    assert [e.type for e in plain] == ["RefundIssued", "CommandRejected"]
    for happened in plain:
        expected, found = event_outcomes(happened), recorded(happened)
        assert found is not None and len(found) == len(expected) == 1
        assert found[0]._replace(event=None) == expected[0]._replace(event=None)
        kept, tracked = found[0].event, expected[0].event
        assert isinstance(kept, RecordedEvent) and isinstance(tracked, TrackedEvent)
        assert (kept.event_id, kept.type, kept.occurred_at, kept.record) == (
            tracked.event_id, tracked.type, tracked.occurred_at, CODEC.encode(happened))
        assert CODEC.decode(kept.record).payload.model_dump(mode="json") == tracked.payload
    assert found is not None and found[0].status is CommandStatus.REJECTED and found[0].reason_code and found[0].reason
    [requested] = aggregate.send(big)
    undo = command("acme", "sub-1", ReverseRefund(refund_command_id=done.id, reason="disputed"))
    granted, *_ = aggregate.send(command("acme", "sub-1", ApproveCommand(command_id=big.id), actor=ADMIN))
    naming_another = [requested, *aggregate.send(undo), granted,
                      event(EffectSucceeded(effect_id=uuid.uuid4(), origin_command_id=done.id, generation=0,
                                            provider="payments", attempts=1, result="{}"), uuid.uuid4())]
    assert [e.type for e in naming_another][:3] == ["ApprovalRequested", "RefundReversed", "ApprovalGranted"]
    assert [recorded(e) for e in naming_another] == [None] * len(naming_another)
    assert recorded(event(CommandRejected(command_type="X", code="c", reason="r"), None)) == []


def test_a_dead_letter_keeps_the_processors_reason() -> None:
    cmd = command("acme", "sub-1", start())
    outcome = dead_letter_outcome(cmd, "handler_error", "boom")
    assert (outcome.command_id, outcome.status, outcome.reason_code) == (cmd.id, CommandStatus.DEAD_LETTERED,
                                                                        "handler_error")


def test_payload_text_reads_back_as_json_dumps_wrote_it() -> None:
    """The kept payload text loads to what ``json.dumps(default=str)`` wrote, on orjson's path and on its fallback."""
    when = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    payloads: list[dict[str, Any]] = [
        {"plan": "pro", "amount_cents": 1200, "ratio": 0.5, "flags": [True, None], "nested": {"k": "v"}},
        {"name": "Zoë \u00e9\u4e2d", "control": "a\x00b\x1f", "quote": '"\\'},
        {"big": 2**70},  # past 64 bits: orjson refuses, json.dumps writes it
        {"lone": "\ud800"},  # a lone surrogate: the same
        {"id": uuid.UUID(int=7), "at": when, "day": when.date()},  # no JSON form: their str, as before
        {"score": float("nan"), "limits": [float("inf"), -float("inf")], "none": None},  # orjson writes null
        {"pair": (1.5, float("nan")), "none": None},
    ]
    for payload in payloads:  # repr: NaN is not equal to itself
        assert repr(json.loads(payload_text(payload))) == repr(json.loads(json.dumps(payload, default=str)))
    for payload in payloads[-2:]:  # NaN stays NaN, not null
        assert payload_text(payload) == json.dumps(payload, default=str)


@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                                 timezone(timedelta(seconds=-3661))])) | st.datetimes())
def test_an_event_time_is_kept_as_isoformat_writes_it(moment: datetime) -> None:
    assert iso_text(moment) == moment.isoformat()
