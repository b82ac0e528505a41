"""The status tracker follows the processor's events and dead letters into the outbox."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, Envelope
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.domain.messages import ApproveCommand, RejectCommand, SetPolicy
from support_desk.messages import ReverseRefund
from keel.gateway.settings import IngressSettings
from keel.outbox.db import open_database
from keel.outbox.enqueue import to_new_command
from keel.outbox.models import CommandRecord, CommandStatus, Outcome, TrackedEvent
from keel.outbox.store import OutboxStore
from keel.processor.worker import CommandProcessor, new_instance_id
from keel.relay.relay import Relay
from keel.relay.tracker import StatusTracker
from tests.helpers import command, refund, start

pytestmark = pytest.mark.integration

CODEC = EnvelopeCodec()
INGRESS = IngressSettings(relay_poll_interval_s=0.01)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OutboxStore]:
    store = OutboxStore(open_database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}"))
    store.migrate()
    yield store
    store.db.close()


def test_statuses_follow_execution_rejection_and_dead_letters(settings: Settings, store: OutboxStore) -> None:
    started, too_much = command("acme", "sub-1", start(price=1000)), command("acme", "sub-1", refund(5000))
    misrouted = command("acme", "sub-2", start())
    rows = [to_new_command(c, CODEC.encode(c)) for c in (started, too_much)]
    wrong_key = to_new_command(misrouted, CODEC.encode(misrouted))._replace(key="acme/elsewhere")
    store.accept([*rows, wrong_key])
    relay = Relay(store, settings, INGRESS)
    assert relay.run_once() == 3
    relay.close()
    processor = CommandProcessor(settings, instance_id=new_instance_id())
    try:
        processor.run_until_caught_up(timeout_s=120)
    finally:
        processor.close()
    tracker = StatusTracker(store, settings)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tracker.run_once(timeout_s=0.5)
            records = [store.get("acme", c.id) for c in (started, too_much, misrouted)]
            if all(r is not None and r.status in {CommandStatus.EXECUTED, CommandStatus.REJECTED,
                                                   CommandStatus.DEAD_LETTERED} for r in records):
                break
    finally:
        tracker.close()
    executed, rejected, dead = records
    assert executed is not None and executed.status is CommandStatus.EXECUTED
    assert [e.type for e in executed.events] == ["SubscriptionStarted"]
    assert executed.events[0].payload["monthly_price_cents"] == 1000
    assert rejected is not None and rejected.status is CommandStatus.REJECTED
    assert rejected.reason_code and rejected.reason and rejected.events[0].type == "CommandRejected"
    assert dead is not None and dead.status is CommandStatus.DEAD_LETTERED and dead.reason_code == "key_mismatch"
    assert store.get("acme", uuid.uuid4()) is None


ADMIN = Actor(kind=ActorKind.HUMAN, id="jane.lead")
POLICY = {
    "version": "tracker-1",
    "roles": {"support-agent": ["*"], "admin": ["*"]},
    "grants": {"agent:support-bot": ["support-agent"], "human:jane.lead": ["admin"]},
    "rules": [{"name": "big-refunds-need-admin",
               "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}},
               "decision": "approve"}],
}
FINAL = {CommandStatus.EXECUTED, CommandStatus.REJECTED, CommandStatus.DEAD_LETTERED}


def run_through(store: OutboxStore, relay: Relay, processor: CommandProcessor, *commands: Envelope) -> None:
    """Accept ``commands`` in the outbox, relay them and let the processor decide them."""
    store.accept([to_new_command(c, CODEC.encode(c)) for c in commands])
    assert relay.run_once() == len(commands)
    processor.run_until_caught_up(timeout_s=120)


def track_until_final(settings: Settings, store: OutboxStore, *commands: Envelope) -> list[CommandRecord]:
    tracker = StatusTracker(store, settings)
    try:
        deadline = time.monotonic() + 60
        while True:
            tracker.run_once(timeout_s=0.5)
            records = [store.get(c.tenant_id, c.id) for c in commands]
            if all(r is not None and r.status in FINAL for r in records) or time.monotonic() > deadline:
                return [r for r in records if r is not None]
    finally:
        tracker.close()


def test_approvals_and_compensations_reach_a_final_status_naming_their_subject(
        settings: Settings, store: OutboxStore) -> None:
    relay, processor = Relay(store, settings, INGRESS), CommandProcessor(settings, instance_id=new_instance_id())
    try:
        # A policy holds from the batch after the one that published it.
        run_through(store, relay, processor,
                    command("acme", "controls", SetPolicy(document=json.dumps(POLICY)), actor=SYSTEM_ACTOR))
        big, refused = command("acme", "sub-1", refund(150_000)), command("acme", "sub-1", refund(120_000))
        run_through(store, relay, processor, command("acme", "sub-1", start(500_000)), big, refused)
        own = command("acme", "sub-1", ApproveCommand(command_id=big.id))  # the agent approving itself
        approve = command("acme", "sub-1", ApproveCommand(command_id=big.id, comment="ok"), actor=ADMIN)
        reject = command("acme", "sub-1", RejectCommand(command_id=refused.id, reason="too much"), actor=ADMIN)
        stray = command("acme", "sub-1", ApproveCommand(command_id=uuid.uuid4()), actor=ADMIN)
        run_through(store, relay, processor, own, approve, reject, stray)
        undo = command("acme", "sub-1", ReverseRefund(refund_command_id=big.id, reason="disputed"), actor=ADMIN,
                       causation_id=big.id)
        run_through(store, relay, processor, undo)
    finally:
        processor.close()
        relay.close()

    records = track_until_final(settings, store, big, refused, own, approve, reject, stray, undo)
    assert " ".join(f"{r.command_type}:{r.status}" for r in records) == (
        "IssueRefund:executed IssueRefund:rejected ApproveCommand:rejected ApproveCommand:executed "
        "RejectCommand:executed ApproveCommand:rejected ReverseRefund:executed")
    parked, rejected, own_record, approved, rejecting, stray_record, undone = records
    # The parked commands keep their whole trail, as before.
    assert sorted(e.type for e in parked.events) == ["ApprovalGranted", "ApprovalRequested", "RefundIssued"]
    assert [e.type for e in rejected.events] == ["ApprovalRequested", "ApprovalRejected"]
    assert (rejected.reason_code, rejected.reason) == ("approval_rejected", "too much")
    # The approving and rejecting commands end executed, and say what they acted on.
    assert approved.reason == f"command {big.id} approved by human:jane.lead"
    assert rejecting.reason == f"command {refused.id} rejected by human:jane.lead: too much"
    assert (approved.reason_code, approved.events, rejecting.reason_code, rejecting.events) == (None, (), None, ())
    # A refused approval is a rejection of the approving command.
    assert own_record.reason_code == "self_approval" and own_record.events[0].type == "CommandRejected"
    assert stray_record.reason_code == "not_pending"
    # The compensation ends executed and names the command it undid.
    assert [e.type for e in undone.events] == ["RefundReversed"]
    assert undone.events[0].payload["reverses"] == str(big.id)
    assert undone.reason == f"command {big.id} undone: disputed"


def test_a_batch_whose_outcomes_interleave_statuses_ends_each_command_at_its_furthest_one(store: OutboxStore) -> None:
    first, second = command("acme", "sub-1", start()), command("acme", "sub-2", start())
    store.accept([to_new_command(c, CODEC.encode(c)) for c in (first, second)])

    def tracked(n: int) -> TrackedEvent:
        return TrackedEvent(event_id=uuid.UUID(int=n), type="SubscriptionStarted",
                            occurred_at="2026-12-05T00:00:00+00:00", payload={"n": n})

    outcomes = [
        Outcome(command_id=first.id, status=CommandStatus.PENDING_APPROVAL, event=tracked(1)),
        Outcome(command_id=second.id, status=CommandStatus.REJECTED, reason_code="no_role", reason="no",
                event=tracked(2)),
        Outcome(command_id=first.id, status=CommandStatus.EXECUTED, event=tracked(3)),
        Outcome(command_id=second.id, status=CommandStatus.EXECUTED, event=tracked(4)),  # behind a rejection: kept out
        Outcome(command_id=first.id, status=CommandStatus.PENDING_APPROVAL, event=tracked(3)),  # the same event again
    ]
    assert store.apply_outcomes(outcomes) == 3  # first: pending, then executed; second: rejected
    assert store.apply_outcomes(outcomes) == 0  # a replayed batch changes nothing
    one, two = store.get("acme", first.id), store.get("acme", second.id)
    assert one is not None and two is not None
    assert one.status is CommandStatus.EXECUTED and [e.payload["n"] for e in one.events] == [1, 3]
    assert (two.status, two.reason_code, two.reason) == (CommandStatus.REJECTED, "no_role", "no")
    assert [e.payload["n"] for e in two.events] == [2, 4]
