"""Governed processing on a real broker: typed rejections, approvals across restarts,
controls that reach every worker, compensation."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Producer

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.domain.principal import Principal
from keel.errors import ValidationError
from keel.domain.messages import ApproveCommand, CommandRejected, SetKillSwitch, SetPolicy, SwitchScope
from support_desk.messages import CancelSubscription, IssueRefund, ReactivateSubscription, ReverseRefund, SendEmail
from keel.kafka.clients import producer_config
from keel.kafka.topics import Topic, topic_name
from keel.processor.worker import CommandProcessor
from keel.sdk.producer import PRINCIPAL_TENANT_HEADER, CommandProducer
from tests.helpers import command, events, refund, send, start

pytestmark = pytest.mark.integration

ADMIN = Actor(kind=ActorKind.HUMAN, id="jane.lead")
POLICY = {
    "version": "p1",
    "roles": {"support-agent": ["StartSubscription", "CancelSubscription", "IssueRefund", "ReverseRefund",
                                "ReactivateSubscription", "SendEmail"],
              "admin": ["*"]},
    "grants": {"agent:support-bot": ["support-agent"], "human:jane.lead": ["admin"]},
    "rules": [
        {"name": "big-refunds-need-admin",
         "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}},
         "decision": "approve"},
        {"name": "no-reactivation", "match": {"command_types": ["ReactivateSubscription"]}, "decision": "deny"},
    ],
}


@pytest.fixture
def worker(settings: Settings) -> Iterator[CommandProcessor]:
    processor = CommandProcessor(settings, instance_id="gov")
    yield processor
    processor.close()


def produce_raw(settings: Settings, value: bytes, key: bytes, headers: list[tuple[str, str | bytes | None]]) -> None:
    producer = Producer(producer_config(settings))
    producer.produce(topic_name(settings, Topic.COMMANDS), value, key, headers=headers)
    assert producer.flush(10) == 0


def set_policy(settings: Settings, worker: CommandProcessor, policy: dict[str, Any], tenant: str = "acme") -> None:
    send(settings, command(tenant, "controls", SetPolicy(document=json.dumps(policy)), actor=SYSTEM_ACTOR))
    worker.run_until_caught_up()


def codes(settings: Settings) -> dict[str, str]:
    """command type + aggregate -> rejection code, for every rejection so far."""
    return {f"{e.payload.command_type}@{e.aggregate_id}": e.payload.code
            for e in events(settings) if isinstance(e.payload, CommandRejected)}


def test_every_rejection_kind_is_a_typed_event_and_the_partition_keeps_flowing(
        settings: Settings, worker: CommandProcessor) -> None:
    set_policy(settings, worker, POLICY)
    set_policy(settings, worker, {"version": "limits-1", "roles": {"member": ["*"]}, "grants": {"*": ["member"]},
                                  "rate_limits": {"actor_per_minute": 2}}, tenant="initech")
    rogue = Actor(kind=ActorKind.AGENT, id="rogue-bot")
    send(settings, command("acme", "sub-ok", start()), command("acme", "sub-deny", start()),
         command("acme", "sub-deny", CancelSubscription(reason="x")))
    worker.run_until_caught_up()
    codec = EnvelopeCodec()
    wrong_tenant = command("acme", "sub-tenant", start())
    produce_raw(settings, codec.encode(wrong_tenant), wrong_tenant.key.encode(),
                [(PRINCIPAL_TENANT_HEADER, b"globex")])
    malformed = command("acme", "sub-malformed", refund(100))
    bad_payload = malformed.model_copy(update={
        "payload": IssueRefund.model_construct(amount_cents=-5, currency="EUR", reason="x", confidence=None)})
    produce_raw(settings, codec.encode(bad_payload), malformed.key.encode(), [])
    send(settings,
         command("acme", "sub-role", start(), actor=rogue),
         command("acme", "sub-ok", refund(100), expected_version=0),
         command("acme", "sub-unknown", refund(100)),
         command("acme", "sub-deny", ReactivateSubscription(reason="x")),
         command("initech", "sub-rate", start()), command("initech", "sub-rate", refund(1)),
         command("initech", "sub-rate", refund(2)))
    send(settings, command("acme", "controls", SetKillSwitch(scope=SwitchScope.COMMAND_TYPE, target="SendEmail",
                                                            engaged=True, reason="incident"), actor=ADMIN))
    worker.run_until_caught_up()
    send(settings, command("acme", "sub-ok", SendEmail(to_address="a@b.c", template="t")))
    worker.run_until_caught_up()

    found = codes(settings)
    assert found["StartSubscription@sub-tenant"] == "wrong_tenant"
    assert found["IssueRefund@sub-malformed"] == "schema_violation"
    assert found["StartSubscription@sub-role"] == "no_role"
    assert found["IssueRefund@sub-ok"] == "version_conflict"
    assert found["IssueRefund@sub-unknown"] == "unknown_aggregate"
    assert found["ReactivateSubscription@sub-deny"] == "policy_denied"
    assert found["IssueRefund@sub-rate"] == "rate_limited"
    assert found["SendEmail@sub-ok"] == "kill_switch"
    assert worker.stats.dead_lettered == 0


def test_a_parked_refund_survives_a_worker_restart_and_two_approvals_execute_it_once(
        settings: Settings, worker: CommandProcessor) -> None:
    set_policy(settings, worker, POLICY)
    big = command("acme", "sub-1", refund(150_000, "EUR"))
    send(settings, command("acme", "sub-1", start(500_000)), big)
    worker.run_until_caught_up()
    worker.close()

    restarted = CommandProcessor(settings, instance_id="gov-2")
    try:
        send(settings, command("acme", "sub-1", ApproveCommand(command_id=big.id), actor=ADMIN),
             command("acme", "sub-1", ApproveCommand(command_id=big.id), actor=ADMIN))
        restarted.run_until_caught_up()
    finally:
        restarted.close()

    kinds = [e.type for e in events(settings) if e.aggregate_id == "sub-1"]
    assert kinds == ["SubscriptionStarted", "ApprovalRequested", "ApprovalGranted", "RefundIssued",
                     "CommandRejected"]
    refunded = [e for e in events(settings) if e.type == "RefundIssued"]
    assert len(refunded) == 1 and refunded[0].causation_id == big.id
    assert [e.version for e in events(settings) if e.aggregate_id == "sub-1"] == [1, 2, 3, 4, None]


def test_a_kill_switch_thrown_on_one_worker_holds_for_a_fresh_worker(settings: Settings,
                                                                       worker: CommandProcessor) -> None:
    send(settings, command("acme", "sub-1", start()),
         command("acme", "controls", SetKillSwitch(scope=SwitchScope.AGENT, target="support-bot", engaged=True,
                                                   reason="incident"), actor=SYSTEM_ACTOR))
    worker.run_until_caught_up()
    worker.close()

    fresh = CommandProcessor(settings, instance_id="fresh")
    try:
        send(settings, command("acme", "sub-1", refund(100)), command("globex", "sub-1", start()))
        fresh.run_until_caught_up()
    finally:
        fresh.close()

    assert codes(settings) == {"IssueRefund@sub-1": "kill_switch"}  # globex is unaffected
    assert [e.type for e in events(settings) if e.tenant_id == "globex"] == ["SubscriptionStarted"]


def test_a_refund_is_compensated_by_a_linked_reversal(settings: Settings, worker: CommandProcessor) -> None:
    issue = command("acme", "sub-1", refund(700))
    send(settings, command("acme", "sub-1", start()), issue)
    worker.run_until_caught_up()
    undo = command("acme", "sub-1", ReverseRefund(refund_command_id=issue.id, reason="customer disputes"),
                   actor=ADMIN, causation_id=issue.id)
    send(settings, undo)
    worker.run_until_caught_up()

    [reversal] = [e for e in events(settings) if e.type == "RefundReversed"]
    assert reversal.payload.reverses == issue.id  # type: ignore[attr-defined]
    assert reversal.causation_id == undo.id
    assert reversal.authority.policy_rule is not None


def test_a_producer_acting_for_one_tenant_cannot_send_for_another(settings: Settings) -> None:
    producer = CommandProducer(settings, principal=Principal(tenant_id="globex", actor=ADMIN))
    with pytest.raises(ValidationError) as caught:
        producer.send(command("acme", "sub-1", start()))
    assert caught.value.code == "wrong_tenant"


def test_a_producer_refuses_a_command_created_before_the_dedupe_window(settings: Settings) -> None:
    month_ago = datetime.now(UTC) - timedelta(seconds=settings.processor_dedupe_window_s + 60)
    with CommandProducer(settings) as producer:
        with pytest.raises(ValidationError) as caught:
            producer.send(command("acme", "sub-1", start(), occurred_at=month_ago))
        producer.send(command("acme", "sub-1", start(), occurred_at=month_ago + timedelta(seconds=120)))
    assert (caught.value.code, caught.value.field) == ("beyond_dedupe_window", "occurred_at")
