"""How events and dead letters become command statuses (the approval events included)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from keel.domain.envelope import Envelope
from keel.domain.messages import CommandRejected, Event, SubscriptionStarted
from keel.outbox.models import CommandStatus
from keel.relay.status import dead_letter_outcome, event_outcome
from tests.helpers import AGENT, command, start


class ApprovalRequested(Event):
    command_id: str


class ApprovalRejected(Event):
    command_id: str
    reason: str


class ApprovalGranted(Event):
    command_id: str


def event(payload: Event, causation: uuid.UUID | None) -> Envelope:
    return Envelope(id=uuid.uuid4(), tenant_id="acme", actor=AGENT, type=type(payload).__name__,
                    aggregate_id="sub-1", causation_id=causation, correlation_id=uuid.uuid4(),
                    occurred_at=datetime.now(UTC), payload=payload)


def test_an_effect_event_marks_its_command_executed_and_is_kept() -> None:
    cause = uuid.uuid4()
    outcome = event_outcome(event(SubscriptionStarted(customer_id="c", plan="p", monthly_price_cents=1,
                                                      currency="EUR"), cause))
    assert outcome is not None and outcome.command_id == cause and outcome.status is CommandStatus.EXECUTED
    assert outcome.event is not None and outcome.event.payload["plan"] == "p"


def test_a_rejection_carries_the_processors_code_and_reason() -> None:
    outcome = event_outcome(event(CommandRejected(command_type="IssueRefund", code="too_much", reason="no"),
                                  uuid.uuid4()))
    assert outcome is not None
    assert (outcome.status, outcome.reason_code, outcome.reason) == (CommandStatus.REJECTED, "too_much", "no")


def test_approval_events_name_their_command_in_the_payload() -> None:
    waiting = uuid.uuid4()
    requested = event_outcome(event(ApprovalRequested(command_id=str(waiting)), uuid.uuid4()))
    granted = event_outcome(event(ApprovalGranted(command_id=str(waiting)), None))
    refused = event_outcome(event(ApprovalRejected(command_id=str(waiting), reason="risky"), None))
    assert requested is not None and requested.command_id == waiting
    assert requested.status is CommandStatus.PENDING_APPROVAL
    assert granted is not None and granted.status is None and granted.event is not None
    assert refused is not None and refused.status is CommandStatus.REJECTED
    assert (refused.reason_code, refused.reason) == ("approval_rejected", "risky")


def test_an_event_that_names_no_command_changes_nothing() -> None:
    assert event_outcome(event(CommandRejected(command_type="X", code="c", reason="r"), None)) is None


def test_a_dead_letter_keeps_the_processors_reason() -> None:
    cmd = command("acme", "sub-1", start())
    outcome = dead_letter_outcome(cmd, "handler_error", "boom")
    assert (outcome.command_id, outcome.status, outcome.reason_code) == (cmd.id, CommandStatus.DEAD_LETTERED,
                                                                        "handler_error")
