"""The approval expiry watcher's rules without Kafka: table changes, due dates, ids, commands."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from keel.domain.envelope import Actor, ActorKind, Envelope, new_command
from keel.domain.messages import ApprovalExpired, ApprovalGranted, ApprovalKind, ApprovalRejected, ApprovalRequested, ExpireApproval
from support_desk.messages import IssueRefund, RefundIssued
from keel.domain.outcomes import to_events
from keel.watchers.approvals_rules import (
    ApprovalSettings,
    Pending,
    PendingSummary,
    change_of,
    expire_command,
    expire_command_id,
    pending_key,
    should_send,
    summarise_pending,
)

NOW = datetime(2026, 3, 1, 12, 30, 45, tzinfo=UTC)
AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
COMMAND_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def _event(payload: object, tenant: str = "acme", aggregate: str = "sub-1") -> Envelope:
    cause = new_command(IssueRefund(amount_cents=1, currency="EUR", reason="r"), tenant_id=tenant,
                        aggregate_id=aggregate, actor=AGENT)
    [event] = to_events(cause, [payload], version=0, now=NOW)  # type: ignore[list-item]
    return event


def _requested(expires_at: datetime = NOW) -> ApprovalRequested:
    return ApprovalRequested(command_id=COMMAND_ID, command_type="IssueRefund",
                             approval_kind=ApprovalKind.APPROVAL, policy_rule="refund-over-500",
                             policy_version="v1", expires_at=expires_at, command="{}")


def test_a_requested_approval_becomes_pending_on_its_tenant_and_aggregate() -> None:
    event = _event(_requested())
    change = change_of(event, partition=4)
    assert change is not None and change.key == "acme/sub-1/" + str(COMMAND_ID)
    assert change.pending == Pending(tenant="acme", aggregate="sub-1", command_id=str(COMMAND_ID),
                                     expires_at=NOW.timestamp(),
                                     correlation_id=str(event.correlation_id), partition=4,
                                     requested_at=event.occurred_at.timestamp())
    assert Pending.from_json(change.pending.to_json()) == change.pending
    older = {k: v for k, v in change.pending.to_json().items() if k != "requested_at"}
    assert Pending.from_json(older).requested_at == 0.0  # entries written before it was kept still read


@pytest.mark.parametrize("ended", [
    ApprovalGranted(command_id=COMMAND_ID, approver="alice"),
    ApprovalRejected(command_id=COMMAND_ID, approver="alice", reason="no"),
    ApprovalExpired(command_id=COMMAND_ID),
])
def test_grant_rejection_and_expiry_end_the_approval(ended: object) -> None:
    change = change_of(_event(ended), partition=4)
    assert change is not None and change.pending is None
    assert change.key == pending_key("acme", "sub-1", COMMAND_ID)


def test_another_tenants_grant_names_another_key() -> None:
    change = change_of(_event(ApprovalGranted(command_id=COMMAND_ID, approver="x"), tenant="globex"), 4)
    assert change is not None and change.key != pending_key("acme", "sub-1", COMMAND_ID)


def test_other_events_change_nothing() -> None:
    assert change_of(_event(RefundIssued(amount_cents=1, currency="EUR", reason="r")), 0) is None


def test_due_once_the_deadline_passed_and_resent_only_after_the_interval() -> None:
    pending = Pending("acme", "sub-1", str(COMMAND_ID), NOW.timestamp(), str(COMMAND_ID), 0)
    now = NOW.timestamp()
    assert not should_send(pending, now=now - 0.1, last_sent=None, resend_s=30)
    assert should_send(pending, now=now, last_sent=None, resend_s=30)
    assert not should_send(pending, now=now + 29, last_sent=now, resend_s=30)
    assert should_send(pending, now=now + 30, last_sent=now, resend_s=30)


def test_the_expiry_id_is_uuid5_of_the_command_id_and_expire() -> None:
    assert expire_command_id(COMMAND_ID) == uuid.uuid5(COMMAND_ID, "expire")
    assert expire_command_id(str(COMMAND_ID)) == expire_command_id(COMMAND_ID)


def test_the_expiry_goes_to_the_approvals_tenant_and_aggregate_as_a_system_command() -> None:
    event = _event(_requested(NOW - timedelta(minutes=1)), aggregate="sub-9")
    change = change_of(event, 2)
    assert change is not None and change.pending is not None
    command = expire_command(change.pending, now=NOW)
    assert command.id == uuid.uuid5(COMMAND_ID, "expire")
    assert command.payload == ExpireApproval(command_id=COMMAND_ID)
    assert command.key == "acme/sub-9"
    assert command.actor == Actor(kind=ActorKind.SERVICE, id="keel-approval-watcher")
    assert command.authority.role == "system"
    assert command.correlation_id == event.correlation_id
    assert expire_command(change.pending).id == command.id, "every re-send has the same id"


def test_settings_come_from_keel_approvals_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_APPROVALS_TICK_S", "0.25")
    monkeypatch.setenv("KEEL_APPROVALS_RESEND_S", "5")
    assert ApprovalSettings() == ApprovalSettings(tick_s=0.25, resend_s=5)


def test_pending_approvals_are_summarised_per_tenant_for_the_metrics() -> None:
    def entry(tenant: str, requested_at: float, expires_at: float) -> Pending:
        return Pending(tenant=tenant, aggregate="a", command_id=str(uuid.uuid4()), expires_at=expires_at,
                       correlation_id=str(uuid.uuid4()), partition=0, requested_at=requested_at)

    summary = summarise_pending([entry("acme", 100.0, 500.0), entry("acme", 40.0, 90.0),
                                 entry("globex", 0.0, 1000.0)], now=200.0)
    assert summary["acme"] == PendingSummary(count=2, oldest_age_s=160.0, overdue=1)
    assert summary["globex"] == PendingSummary(count=1, oldest_age_s=0.0, overdue=0)  # age unknown: not guessed
