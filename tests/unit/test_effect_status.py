"""How an effect's records fold into its status row, and what the agent's summary and wait make of it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.domain.envelope import Envelope, Payload
from keel.domain.events import ApprovalGranted, EffectCancelled, EffectFailed, EffectRetried, EffectSucceeded
from keel.effects.progress import EffectReport, EffectState, WaitReason
from keel.effects.status import EffectChange, EffectRecord, Stage, fold, from_event, from_report, new_row
from keel.errors import ValidationError
from keel.outbox.models import CommandRecord, CommandStatus
from keel.relay.status import event_outcomes
from keel.client import EndedOtherwise
from keel.client.waiting import reached, target
from support_desk.messages import RefundIssued
from tests.helpers import AGENT

ORIGIN, EFFECT = uuid.uuid4(), uuid.uuid4()
WORKER_COMMAND = uuid.uuid4()


def envelope(payload: Payload, causation: uuid.UUID | None = WORKER_COMMAND, event_id: uuid.UUID | None = None
             ) -> Envelope:
    return Envelope(id=event_id or uuid.uuid4(), tenant_id="acme", actor=AGENT, type=type(payload).__name__,
                    aggregate_id="sub-1", causation_id=causation, correlation_id=uuid.uuid4(),
                    occurred_at=datetime.now(UTC), payload=payload)


def opened() -> EffectChange:
    refund = envelope(RefundIssued(amount_cents=500, currency="EUR", reason="late"), ORIGIN, EFFECT)
    change = from_event(refund, partition=2, offset=41, provider="payments")
    assert change is not None
    return change


def report(generation: int, seq: int, state: EffectState, **fields: object) -> EffectChange:
    values: dict[str, object] = {
        "tenant_id": "acme", "effect_id": EFFECT, "origin_command_id": ORIGIN, "aggregate_id": "sub-1",
        "event_type": "RefundIssued", "provider": "payments", "generation": generation, "seq": seq, "state": state,
        "attempts": seq, "at": 1.0, "worker": "w-1", **fields}
    return from_report(EffectReport.model_validate(values))


def outcome(payload: Payload) -> EffectChange:
    change = from_event(envelope(payload), partition=0, offset=99, provider=None)
    assert change is not None
    return change


def succeeded(generation: int = 0) -> EffectChange:
    return outcome(EffectSucceeded(effect_id=EFFECT, origin_command_id=ORIGIN, generation=generation,
                                   provider="payments", attempts=2, result='{"refund": "re_1"}'))


def failed(generation: int = 0) -> EffectChange:
    return outcome(EffectFailed(effect_id=EFFECT, origin_command_id=ORIGIN, generation=generation,
                                provider="payments", attempts=3, code="card_declined", error="declined"))


def retried(generation: int = 1) -> EffectChange:
    return outcome(EffectRetried(effect_id=EFFECT, origin_command_id=ORIGIN, generation=generation,
                                 reason="card updated", event_partition=2, event_offset=41))


def run(*changes: EffectChange) -> EffectRecord:
    row: EffectRecord | None = None
    for change in changes:
        row = fold(row, change, now=7.0) or row
    assert row is not None
    return row


def test_the_effects_event_opens_it_pending_where_the_event_is() -> None:
    row = run(opened())
    assert (row.state, row.generation, row.attempts) == (EffectState.PENDING, 0, 0)
    assert (row.event_type, row.provider, row.origin_command_id) == ("RefundIssued", "payments", ORIGIN)
    assert (row.event_partition, row.event_offset, row.tenant_id, row.aggregate_id) == (2, 41, "acme", "sub-1")


def test_an_event_without_an_effect_or_a_cause_opens_nothing() -> None:
    refund = RefundIssued(amount_cents=500, currency="EUR", reason="late")
    assert from_event(envelope(refund, ORIGIN), partition=0, offset=0, provider=None) is None
    assert from_event(envelope(refund, None), partition=0, offset=0, provider="payments") is None


def test_reports_move_the_effect_by_seq_and_an_older_or_repeated_one_changes_nothing() -> None:
    waiting = report(0, 2, EffectState.WAITING, reason=WaitReason.BACKOFF, detail="503", next_attempt_at=9.5)
    row = run(opened(), report(0, 1, EffectState.RUNNING), waiting)
    assert (row.state, row.reason, row.detail, row.next_attempt_at, row.attempts) == (
        EffectState.WAITING, WaitReason.BACKOFF, "503", 9.5, 2)
    assert fold(row, report(0, 1, EffectState.RUNNING), now=8.0) is None
    assert fold(row, waiting, now=8.0) is None
    assert fold(row, opened(), now=8.0) is None


def test_a_report_before_the_event_keeps_its_state_and_the_event_adds_where_it_is() -> None:
    early = run(report(0, 0, EffectState.RUNNING))
    assert early.event_partition is None and early.state is EffectState.RUNNING
    row = fold(early, opened(), now=8.0)
    assert row is not None and (row.state, row.event_partition, row.event_offset) == (EffectState.RUNNING, 2, 41)
    assert row.updated_at == 8.0


def test_an_outcome_outranks_every_report_of_its_generation() -> None:
    row = run(opened(), succeeded(), report(0, 99, EffectState.RUNNING))
    assert (row.state, row.stage, row.result, row.attempts) == (EffectState.SUCCEEDED, Stage.SETTLED,
                                                                 '{"refund": "re_1"}', 2)


def test_a_retry_opens_the_next_generation_pending_and_outranks_the_old_outcome() -> None:
    row = run(opened(), report(0, 1, EffectState.RUNNING), failed(), retried())
    assert (row.state, row.generation, row.attempts, row.error_code, row.error) == (
        EffectState.PENDING, 1, 0, None, None)
    assert row.detail == "retried: card updated"
    # Its reports come after it; an outcome of the old generation arriving late changes nothing.
    assert fold(row, failed(0), now=9.0) is None
    later = run(opened(), report(0, 1, EffectState.RUNNING), failed(), retried(), report(1, 0, EffectState.RUNNING))
    assert (later.state, later.generation) == (EffectState.RUNNING, 1)


def test_a_report_of_the_next_generation_outranks_the_old_outcome_and_the_retry_arriving_late() -> None:
    row = run(opened(), failed(), report(1, 0, EffectState.RUNNING), retried())
    assert (row.state, row.generation, row.stage) == (EffectState.RUNNING, 1, Stage.REPORTED)


def test_a_cancellation_keeps_the_attempts_made_and_says_why() -> None:
    cancel = outcome(EffectCancelled(effect_id=EFFECT, origin_command_id=ORIGIN, generation=0,
                                     code="cancelled_by_operator", reason="customer called"))
    row = run(opened(), report(0, 3, EffectState.WAITING, reason=WaitReason.BREAKER), cancel)
    assert (row.state, row.attempts, row.error_code, row.error) == (
        EffectState.CANCELLED, 3, "cancelled_by_operator", "customer called")


@settings(max_examples=200, deadline=None)
@given(st.permutations([opened(), report(0, 0, EffectState.RUNNING), report(0, 1, EffectState.WAITING),
                        failed(), retried(), report(1, 0, EffectState.RUNNING), succeeded(1)]))
def test_any_order_and_any_replay_of_the_records_folds_to_the_same_row(changes: list[EffectChange]) -> None:
    row = run(*changes, *changes[:3])
    assert (row.state, row.generation, row.attempts, row.result) == (
        EffectState.SUCCEEDED, 1, 2, '{"refund": "re_1"}')
    assert (row.event_type, row.event_partition, row.event_offset, row.provider) == ("RefundIssued", 2, 41, "payments")


def test_a_new_effects_row_is_the_fold_of_its_first_change_whatever_the_change() -> None:
    cancel = outcome(EffectCancelled(effect_id=EFFECT, origin_command_id=ORIGIN, generation=0,
                                     code="cancelled_by_operator", reason="customer called"))
    for change in (opened(), report(0, 2, EffectState.WAITING, reason=WaitReason.BACKOFF, next_attempt_at=9.5),
                   succeeded(), failed(), retried(), cancel):
        row = fold(None, change, now=7.0)
        assert row is not None
        assert new_row(change, 7.0) == row.model_dump(mode="json")


def record(status: CommandStatus, *states: EffectState, reason: WaitReason | None = None) -> CommandRecord:
    effects = tuple(run(opened()).model_copy(update={"effect_id": uuid.uuid4(), "state": state, "reason": reason})
                    for state in states)
    return CommandRecord(command_id=ORIGIN, tenant_id="acme", command_type="IssueRefund", key="acme/sub-1",
                         status=status, reason_code="approval_rejected" if status is CommandStatus.REJECTED else None,
                         created_at=1.0, updated_at=1.0, effects=effects)


def test_the_summary_says_what_the_agent_waits_on() -> None:
    parked = record(CommandStatus.PENDING_APPROVAL).summary
    assert (parked.state, parked.reason, parked.done) == (EffectState.WAITING, WaitReason.APPROVAL, False)
    assert record(CommandStatus.PUBLISHED).summary.state is EffectState.PENDING
    both = record(CommandStatus.EXECUTED, EffectState.SUCCEEDED, EffectState.WAITING, reason=WaitReason.BREAKER)
    assert (both.summary.state, both.summary.reason, both.summary.done) == (
        EffectState.WAITING, WaitReason.BREAKER, False)
    assert record(CommandStatus.EXECUTED, EffectState.SUCCEEDED, EffectState.FAILED).summary.state is EffectState.FAILED
    settled = record(CommandStatus.EXECUTED, EffectState.SUCCEEDED).summary
    assert (settled.state, settled.done) == (EffectState.SUCCEEDED, True)
    assert record(CommandStatus.EXECUTED).summary.done  # no effects: done once executed
    refused = record(CommandStatus.REJECTED).summary
    assert (refused.state, refused.detail, refused.done) == (EffectState.FAILED, "rejected: approval_rejected", True)


def test_an_effects_outcome_joins_its_origin_commands_trail_and_ends_the_command_that_caused_it() -> None:
    origin, caused = event_outcomes(envelope(EffectSucceeded(
        effect_id=EFFECT, origin_command_id=ORIGIN, generation=0, provider="payments", attempts=1, result="{}")))
    assert (origin.command_id, origin.status) == (ORIGIN, None)
    assert origin.event is not None and origin.event.type == "EffectSucceeded"
    assert (caused.command_id, caused.status, caused.subject_command_id, caused.event) == (
        WORKER_COMMAND, CommandStatus.EXECUTED, ORIGIN, None)
    assert caused.reason == f"effect {EFFECT} of command {ORIGIN} succeeded"
    [approval, _] = event_outcomes(envelope(ApprovalGranted(command_id=ORIGIN, approver="human:jane")))
    assert approval.command_id == ORIGIN  # approvals name their subject as before


def test_a_wait_ends_at_the_state_asked_for_or_fails_once_it_cannot_come() -> None:
    assert target("executed") is CommandStatus.EXECUTED and target("succeeded") is EffectState.SUCCEEDED
    with pytest.raises(ValidationError) as unknown:
        target("finished")
    assert unknown.value.code == "bad_until"
    assert reached(record(CommandStatus.EXECUTED, EffectState.PENDING), CommandStatus.EXECUTED)
    assert not reached(record(CommandStatus.EXECUTED, EffectState.RUNNING), EffectState.SUCCEEDED)
    assert not reached(record(CommandStatus.PENDING_APPROVAL), EffectState.SUCCEEDED)
    assert reached(record(CommandStatus.EXECUTED, EffectState.SUCCEEDED), EffectState.SUCCEEDED)
    with pytest.raises(EndedOtherwise, match="ended failed, not succeeded") as ended:
        reached(record(CommandStatus.EXECUTED, EffectState.FAILED), EffectState.SUCCEEDED)
    assert ended.value.code == "ended_otherwise" and ended.value.record.status is CommandStatus.EXECUTED
    with pytest.raises(EndedOtherwise, match="ended rejected, not executed"):
        reached(record(CommandStatus.REJECTED), CommandStatus.EXECUTED)
