"""The derived projections (command lifecycle, approvals, agent activity, tenant metrics) on chDB.

Events of types the processor does not emit yet (approvals, breakers, reversals) are inserted
as rows directly, shaped as the projector writes them: the views read only ``type`` and the
JSON ``payload``, so they work as soon as those events exist.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from keel.domain.envelope import Actor, ActorKind, new_command
from support_desk.messages import CancelSubscription, IssueRefund
from keel.projector.rows import EVENT_COLUMNS, Position, event_row
from keel.projector.store import Batch, insert_batch

pytestmark = pytest.mark.integration

T0 = datetime(2030, 5, 1, 10, 0, tzinfo=UTC)
BOT = Actor(kind=ActorKind.AGENT, id="bot-1")
C1, C2, C3 = (uuid.UUID(int=n) for n in (1, 2, 3))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def row(tenant: str, type_: str, payload: dict[str, Any], *, when: datetime, causation: uuid.UUID | None,
        actor: Actor = BOT, version: int | None = None) -> dict[str, Any]:
    """An events row as the projector writes it."""
    return {
        "tenant_id": tenant, "aggregate_id": "sub-1", "version": version, "event_id": uuid.uuid4(),
        "type": type_, "schema_version": 1, "actor_kind": actor.kind.value, "actor_id": actor.id,
        "delegation": "[]", "on_behalf_of": None, "authority_role": None, "authority_grant": None,
        "authority_policy_rule": None, "authority_policy_version": None, "authority_approval_id": None,
        "expected_version": None, "causation_id": causation, "correlation_id": causation or uuid.uuid4(),
        "occurred_at": when, "traceparent": None, "payload": json.dumps(payload), "_topic": "t",
        "_partition": 0, "_offset": 0,
    }


def insert_rows(client: Client, rows: list[dict[str, Any]], token: str) -> None:
    batch = Batch("t")
    for offset, values in enumerate(rows):
        values = {**values, "_offset": offset}
        batch.add([values[c] for c in EVENT_COLUMNS], Position("t", 0, offset))
    client.insert("events", batch.rows, column_names=list(EVENT_COLUMNS),
                  settings={"insert_deduplication_token": token,
                            "deduplicate_blocks_in_dependent_materialized_views": 1})


def story(client: Client) -> None:
    """acme: a refund approved then executed, a refund rejected, a cancellation refused by the approver."""
    jane, joe = Actor(kind=ActorKind.HUMAN, id="jane"), Actor(kind=ActorKind.HUMAN, id="joe")
    watcher = Actor(kind=ActorKind.SERVICE, id="breaker-watch")
    commands = [
        new_command(IssueRefund(amount_cents=500, currency="EUR", reason="r"), tenant_id="acme",
                    aggregate_id="sub-1", actor=BOT, command_id=C1, occurred_at=at(0)),
        new_command(IssueRefund(amount_cents=10**6, currency="EUR", reason="r"), tenant_id="acme",
                    aggregate_id="sub-1", actor=BOT, command_id=C2, occurred_at=at(0)),
        new_command(CancelSubscription(reason="r"), tenant_id="acme", aggregate_id="sub-1", actor=BOT,
                    command_id=C3, occurred_at=at(0)),
    ]
    batch = Batch("c")
    for offset, command in enumerate(commands):
        batch.add(event_row(command, Position("c", 0, offset)), Position("c", 0, offset))
    insert_batch(client, batch, "commands")
    asked = {"command_type": "IssueRefund", "policy_rule": "refunds.large", "policy_version": "7",
             "expires_at": "2030-05-02T10:00:00+00:00"}
    insert_rows(client, [
        row("acme", "ApprovalRequested", {**asked, "command_id": str(C1)}, when=at(1), causation=C1),
        row("acme", "ApprovalGranted", {"command_id": str(C1), "approver": "jane"}, when=at(61),
            causation=uuid.uuid4(), actor=jane),
        row("acme", "RefundIssued", {"amount_cents": 500, "currency": "EUR", "reason": "r"}, when=at(62),
            causation=C1, version=2),
        row("acme", "CommandRejected", {"command_type": "IssueRefund", "code": "refund_exceeds_paid",
                                        "reason": "too much"}, when=at(0.5), causation=C2),
        row("acme", "ApprovalRequested", {**asked, "command_type": "CancelSubscription", "command_id": str(C3)},
            when=at(2), causation=C3),
        row("acme", "ApprovalRejected", {"command_id": str(C3), "approver": "joe", "reason": "keep them"},
            when=at(32), causation=uuid.uuid4(), actor=joe),
        row("acme", "BreakerTripped", {"agent_id": "bot-1", "reason": "3 rejections in 5 minutes"},
            when=at(70), causation=None, actor=watcher),
        row("acme", "RefundReversed", {"amount_cents": 200, "currency": "EUR", "reason": "chargeback",
                                       "reverses": str(uuid.uuid4())}, when=at(3600), causation=uuid.uuid4(),
            version=3),
        row("globex", "RefundIssued", {"amount_cents": 999, "currency": "USD", "reason": "r"}, when=at(5),
            causation=uuid.uuid4(), version=2),
    ], token="story")


def named(client: Client, sql: str) -> list[dict[str, Any]]:
    return list(client.query(sql).named_results())


def test_command_lifecycle_has_each_step_and_its_timings(migrated: Client) -> None:
    story(migrated)

    rows = {r["command_id"]: r for r in named(migrated, "SELECT * FROM command_lifecycle WHERE tenant_id = 'acme'")}

    approved, rejected, refused = rows[C1], rows[C2], rows[C3]
    assert (approved["status"], approved["command_type"], approved["actor_id"]) == ("executed", "IssueRefund", "bot-1")
    assert (approved["submitted_at"], approved["decided_at"], approved["approved_at"], approved["executed_at"]) == (
        at(0), at(1), at(61), at(62))
    assert (approved["decision_ms"], approved["approval_wait_ms"], approved["submit_to_execute_ms"]) == (
        1000, 60_000, 62_000)
    assert (rejected["status"], rejected["rejection_code"], rejected["decision_ms"]) == (
        "rejected", "refund_exceeds_paid", 500)
    assert rejected["executed_at"] is None and rejected["approval_requested_at"] is None
    assert (refused["status"], refused["approval_wait_ms"], refused["executed_at"]) == ("rejected", 30_000, None)


def test_approvals_name_the_approver_and_the_time_to_decision(migrated: Client) -> None:
    story(migrated)

    rows = {r["command_id"]: r for r in named(migrated, "SELECT * FROM approvals")}

    assert set(rows) == {C1, C3}
    assert (rows[C1]["outcome"], rows[C1]["approver"], rows[C1]["time_to_decision_ms"]) == ("approved", "jane", 60_000)
    assert (rows[C1]["policy_rule"], rows[C1]["policy_version"], rows[C1]["requested_by"]) == (
        "refunds.large", "7", "bot-1")
    assert (rows[C3]["outcome"], rows[C3]["approver"], rows[C3]["rejection_reason"]) == ("rejected", "joe", "keep them")
    assert rows[C3]["command_type"] == "CancelSubscription"


def test_agent_activity_counts_actions_rejections_and_guardrail_trips(migrated: Client) -> None:
    story(migrated)

    rows = named(migrated, "SELECT actor_id, sum(actions) AS actions, sum(rejections) AS rejections, "
                           "sum(guardrail_trips) AS trips, sum(approvals_requested) AS asked FROM agent_activity "
                           "WHERE tenant_id = 'acme' AND actor_kind = 'agent' GROUP BY actor_id")

    # actions: the refund and its reversal; the breaker trip counts against bot-1, not the watcher
    assert rows == [{"actor_id": "bot-1", "actions": 2, "rejections": 1, "trips": 1, "asked": 2}]


def test_tenant_metrics_and_refund_totals_per_tenant(migrated: Client) -> None:
    story(migrated)

    totals = named(migrated, "SELECT * FROM refund_totals ORDER BY tenant_id")
    hourly = named(migrated, "SELECT toString(hour) AS hour, type, events FROM tenant_metrics WHERE tenant_id = 'acme' "
                             "AND type IN ('RefundIssued', 'RefundReversed') ORDER BY hour")

    assert totals == [
        {"tenant_id": "acme", "currency": "EUR", "refunds": 1, "refunded_cents": 500, "reversed_cents": 200,
         "net_refunded_cents": 300},
        {"tenant_id": "globex", "currency": "USD", "refunds": 1, "refunded_cents": 999, "reversed_cents": 0,
         "net_refunded_cents": 999},
    ]
    assert [(r["hour"], r["type"], r["events"]) for r in hourly] == [
        ("2030-05-01 10:00:00", "RefundIssued", 1), ("2030-05-01 11:00:00", "RefundReversed", 1)]


def test_a_retried_batch_is_counted_once_in_the_aggregated_metrics(migrated: Client) -> None:
    story(migrated)
    rows = [row("globex", "RefundIssued", {"amount_cents": 1, "currency": "USD", "reason": "r"}, when=at(9),
                causation=uuid.uuid4(), version=3)]

    insert_rows(migrated, rows, token="retry")
    insert_rows(migrated, rows, token="retry")

    assert named(migrated, "SELECT refunds, refunded_cents FROM refund_totals WHERE tenant_id = 'globex'") == [
        {"refunds": 2, "refunded_cents": 1000}]
