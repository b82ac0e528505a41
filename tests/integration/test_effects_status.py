"""Effects' states through the real path: the processor records the events, reports reach the
effects topic as workers send them, the status tracker folds both into the outbox, and the
gateway (served by uvicorn) shows them to the agent, by record, stream and SDK."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from httpx_sse import connect_sse

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.commands import CompleteEffect, FailEffect, RetryEffect
from keel.domain.effects import outcome_command_id
from keel.domain.envelope import Actor, ActorKind, Envelope
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.domain.messages import ApproveCommand, SetPolicy
from keel.domain.outcomes import event_id, to_events
from keel.effects.progress import EffectReport, EffectState, WaitReason
from keel.effects.status import EffectRecord
from keel.gateway.app import create_app
from keel.gateway.settings import IngressSettings
from keel.kafka.clients import admin_config, producer_config
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.enqueue import to_new_command
from keel.outbox.models import CommandRecord, CommandStatus
from keel.outbox.store import OutboxStore
from keel.processor.worker import EFFECT_HEADER, CommandProcessor, new_instance_id
from keel.relay.relay import Relay
from keel.relay.tracker import StatusTracker
from keel.client import KeelClient, RequestRefused, WaitTimedOut
from keel.security.keys import KeyStore
from tests.broker_faults import free_port
from support_desk.messages import SubscriptionStarted
from tests.helpers import command, refund, send, start

pytestmark = pytest.mark.integration

CODEC = EnvelopeCodec()
ADMIN = Actor(kind=ActorKind.HUMAN, id="jane.lead")
OPERATOR = Actor(kind=ActorKind.HUMAN, id="olga.ops")
POLICY = {
    "version": "effects-1",
    "roles": {"support-agent": ["*"], "admin": ["*"]},
    "grants": {"agent:support-bot": ["support-agent"], "human:jane.lead": ["admin"]},
    "rules": [{"name": "big-refunds-need-admin",
               "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}},
               "decision": "approve"}],
}
T = TypeVar("T")


class Pipeline:
    """The outbox, relay, processor and a tracker following the topics in the background."""

    def __init__(self, settings: Settings, dsn: str) -> None:
        self.settings, self.dsn = settings, dsn
        self.store = OutboxStore(open_database(dsn))
        self.store.migrate()
        self.relay = Relay(self.store, settings, IngressSettings(relay_poll_interval_s=0.01))
        self.processor = CommandProcessor(settings, instance_id=new_instance_id())
        self.reports = Producer(producer_config(settings))
        self.seq = 0
        self.tracker = StatusTracker(self.store, settings)
        self._stop = threading.Event()
        self._tracking = threading.Thread(target=self._track, daemon=True)
        self._tracking.start()

    def _track(self) -> None:
        try:
            self.tracker.run(self._stop)
        finally:
            self.tracker.close()

    def accept(self, *commands: Envelope) -> None:
        """Commands through the outbox (as the gateway writes them) and the relay, then decided."""
        self.store.accept([to_new_command(c, CODEC.encode(c)) for c in commands])
        self.relayed()

    def relayed(self) -> None:
        while self.relay.run_once():
            pass
        self.processor.run_until_caught_up(timeout_s=60)

    def direct(self, *commands: Envelope) -> None:
        """Commands sent straight to Kafka (as workers and operators do), then decided."""
        send(self.settings, *commands)
        self.processor.run_until_caught_up(timeout_s=60)

    def report(self, effect: EffectRecord | uuid.UUID, origin: uuid.UUID, generation: int, state: EffectState,
               **fields: Any) -> None:
        """A worker's report on the effects topic."""
        self.seq += 1
        sent = EffectReport(tenant_id="acme", effect_id=effect if isinstance(effect, uuid.UUID) else effect.effect_id,
                            origin_command_id=origin, aggregate_id="sub-1", event_type="RefundIssued",
                            provider="payments", generation=generation, seq=self.seq, state=state,
                            attempts=fields.pop("attempts", 1), at=time.time(), worker="test-worker", **fields)
        self.reports.produce(topic_name(self.settings, Topic.EFFECTS), key=sent.key, value=sent.model_dump_json())
        assert self.reports.flush(10) == 0

    def record(self, command_id: uuid.UUID, until: Callable[[CommandRecord], bool], what: str) -> CommandRecord:
        return eventually(lambda: found if (found := self.store.get("acme", command_id)) and until(found) else None,
                          what)

    def stop_tracking(self) -> None:
        self._stop.set()
        self._tracking.join(30)

    def close(self) -> None:
        self.stop_tracking()
        self.processor.close()
        self.relay.close()
        self.store.db.close()


def eventually(probe: Callable[[], T | None], what: str, timeout_s: float = 60.0) -> T:
    deadline = time.monotonic() + timeout_s
    while (found := probe()) is None:
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)
    return found


@pytest.fixture
def pipeline(settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    running = Pipeline(settings, f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    yield running
    running.close()


class Gateway:
    """The gateway app served by uvicorn on a free port, in a thread of this process."""

    def __init__(self, settings: Settings, dsn: str) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings, IngressSettings(outbox_dsn=dsn)),
                                                    host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        eventually(lambda: self.server.started or None, "the gateway serves", timeout_s=30)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def gateway(settings: Settings, pipeline: Pipeline) -> Iterator[Gateway]:
    served = Gateway(settings, pipeline.dsn)
    yield served
    served.close()


def api_key(store: OutboxStore, tenant: str, actor: Actor) -> str:
    keys = KeyStore(store.db)
    keys.create_tenant(tenant)
    return keys.create_key(tenant, actor, frozenset({"support-agent"}))[1]


def shape(record: dict[str, Any]) -> tuple[object, ...]:
    """What an agent follows: the command's status, the summary, and each effect's state."""
    summary = record["summary"]
    return record["status"], summary["state"], summary["reason"], tuple(e["state"] for e in record["effects"])


def test_an_agent_follows_its_refund_from_approval_to_the_outcome_of_its_effect(
        pipeline: Pipeline, gateway: Gateway) -> None:
    pipeline.accept(command("acme", "controls", SetPolicy(document=json.dumps(POLICY)), actor=SYSTEM_ACTOR))
    pipeline.accept(command("acme", "sub-1", start(500_000)))
    token = api_key(pipeline.store, "acme", Actor(kind=ActorKind.AGENT, id="support-bot"))
    agent = KeelClient(gateway.base, token)

    accepted = agent.submit("IssueRefund", "sub-1", {"amount_cents": 150_000, "currency": "EUR", "reason": "outage"},
                            on_behalf_of="cust-1")
    parked_id = accepted.command_id
    pipeline.relayed()
    parked = agent.wait(parked_id, until="pending_approval", timeout_s=60)
    assert (parked.summary.state, parked.summary.reason, parked.effects) == (
        EffectState.WAITING, WaitReason.APPROVAL, ())
    with pytest.raises(WaitTimedOut) as late:
        agent.wait(parked_id, until="executed", timeout_s=1)
    assert late.value.record is not None and late.value.record.status is CommandStatus.PENDING_APPROVAL

    # The agent follows the stream, and another wait blocks until the effect succeeded.
    streamed: list[dict[str, Any]] = []
    waited: list[CommandRecord] = []

    def follow() -> None:
        with httpx.Client(base_url=gateway.base, headers={"Authorization": f"Bearer {token}"}, timeout=90) as http, \
                connect_sse(http, "GET", f"/v1/commands/{parked_id}/stream", params={"timeout_s": 90}) as source:
            streamed.extend(json.loads(sent.data) for sent in source.iter_sse() if sent.event == "status")

    threads = [threading.Thread(target=follow),
               threading.Thread(target=lambda: waited.append(agent.wait(parked_id, "succeeded", timeout_s=90)))]
    for thread in threads:
        thread.start()
    time.sleep(0.5)

    pipeline.direct(command("acme", "sub-1", ApproveCommand(command_id=parked_id, comment="ok"), actor=ADMIN))
    pending = pipeline.record(parked_id, lambda r: bool(r.effects), "the refund's effect opens").effects[0]
    time.sleep(0.6)  # the stream looks every 0.2 s: it sees each state
    pipeline.report(pending, parked_id, 0, EffectState.RUNNING)
    pipeline.record(parked_id, lambda r: r.effects[0].state is EffectState.RUNNING, "the report is folded")
    time.sleep(0.6)
    pipeline.direct(command("acme", "sub-1", CompleteEffect(
        effect_id=pending.effect_id, generation=0, provider="payments", attempts=1, result='{"refund": "re_1"}'),
        actor=SYSTEM_ACTOR, command_id=outcome_command_id(pending.effect_id, 0)))
    for thread in threads:
        thread.join(90)

    steps = [shape(record) for record in streamed]
    assert [step for index, step in enumerate(steps) if index == 0 or steps[index - 1] != step] == [
        ("pending_approval", "waiting", "approval", ()),
        ("executed", "pending", None, ("pending",)),
        ("executed", "running", None, ("running",)),
        ("executed", "succeeded", None, ("succeeded",)),
    ]
    assert streamed[-1]["summary"]["done"] is True  # and the stream ended there
    [done] = waited
    assert done.summary.state is EffectState.SUCCEEDED

    final = agent.status(parked_id)
    [effect] = final.effects
    assert (effect.event_type, effect.provider, effect.state, effect.attempts, effect.generation) == (
        "RefundIssued", "payments", EffectState.SUCCEEDED, 1, 0)
    assert json.loads(effect.result or "") == {"refund": "re_1"} and effect.origin_command_id == parked_id
    assert [e.event_id for e in final.events if e.type == "RefundIssued"] == [effect.effect_id]
    assert effect.event_partition is not None and effect.event_offset is not None
    assert sorted(e.type for e in final.events) == ["ApprovalGranted", "ApprovalRequested", "EffectSucceeded",
                                                    "RefundIssued"]
    agent.close()
    with KeelClient(gateway.base, api_key(pipeline.store, "globex", Actor(kind=ActorKind.AGENT, id="bot"))) as other:
        reads: list[Callable[[], CommandRecord]] = [lambda: other.status(parked_id),
                                                    lambda: other.wait(parked_id, timeout_s=5)]
        for read in reads:
            with pytest.raises(RequestRefused) as refused:
                read()
            assert (refused.value.status, refused.value.code) == (404, "not_found")


@pytest.fixture(params=["sqlite", "postgres"])
def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    return str(request.getfixturevalue("postgres_dsn"))


def test_reports_and_events_in_any_order_fold_once_and_a_replay_changes_nothing(
        settings: Settings, dsn: str) -> None:
    pipeline = Pipeline(settings, dsn)
    try:
        pipeline.accept(command("acme", "sub-1", start(5000)))
        paid = command("acme", "sub-1", refund(500))
        effect_id = event_id(paid.id, 0)  # the RefundIssued it will yield
        # A worker's reports can reach the tracker before the event they are about.
        pipeline.report(effect_id, paid.id, 0, EffectState.RUNNING)
        pipeline.report(effect_id, paid.id, 0, EffectState.WAITING, reason=WaitReason.BACKOFF, detail="503",
                        next_attempt_at=time.time() + 5, attempts=2)
        early = eventually(lambda: pipeline.store.effect("acme", effect_id), "the reports are folded")
        assert (early.state, early.event_partition) == (EffectState.WAITING, None)

        pipeline.accept(paid)
        opened = eventually(lambda: found if (found := pipeline.store.effect("acme", effect_id)) and
                            found.event_offset is not None else None, "the event says where it is")
        assert opened.event_partition is not None and opened.event_offset is not None
        assert (opened.state, opened.reason, opened.attempts) == (EffectState.WAITING, WaitReason.BACKOFF, 2)

        pipeline.direct(command("acme", "sub-1", FailEffect(effect_id=effect_id, generation=0, provider="payments",
                                                            attempts=3, code="declined", error="card declined"),
                                actor=SYSTEM_ACTOR, command_id=outcome_command_id(effect_id, 0)))
        pipeline.report(effect_id, paid.id, 0, EffectState.RUNNING)  # a worker late with an old report
        retry = command("acme", "sub-1", RetryEffect(effect_id=effect_id, reason="card updated",
                                                     event_partition=opened.event_partition,
                                                     event_offset=opened.event_offset), actor=OPERATOR)
        pipeline.accept(retry)
        pipeline.report(effect_id, paid.id, 1, EffectState.RUNNING)
        pipeline.direct(command("acme", "sub-1", CompleteEffect(effect_id=effect_id, generation=1, provider="payments",
                                                                attempts=1, result="{}"),
                                actor=SYSTEM_ACTOR, command_id=outcome_command_id(effect_id, 1)))
        final = pipeline.record(paid.id, lambda r: r.summary.state is EffectState.SUCCEEDED,
                                "the retried effect succeeds")
        [effect] = final.effects
        assert (effect.state, effect.generation, effect.attempts, effect.error_code, effect.result) == (
            EffectState.SUCCEEDED, 1, 1, None, "{}")
        assert (effect.event_partition, effect.event_offset) == (opened.event_partition, opened.event_offset)
        assert sorted(e.type for e in final.events) == ["EffectFailed", "EffectRetried", "EffectSucceeded",
                                                        "RefundIssued"]
        assert final.status is CommandStatus.EXECUTED
        retried = pipeline.record(retry.id, lambda r: r.status is CommandStatus.EXECUTED, "the retry is executed")
        assert retried.reason == f"effect {effect_id} of command {paid.id} retried as generation 1: card updated"
        pipeline.stop_tracking()

        # Every record again, from the start: nothing changes.
        admin = AdminClient(admin_config(settings))
        for future in admin.delete_consumer_groups([f"{settings.topic_prefix}.tracker"]).values():
            future.result(timeout=30)
        again = StatusTracker(pipeline.store, settings)
        try:
            changed, before, deadline = 0, -1, time.monotonic() + 60
            while (again.applied != before or not again.applied) and time.monotonic() < deadline:
                before = again.applied  # until a poll of 2 s brings nothing more
                changed += again.run_once(timeout_s=2.0)
        finally:
            again.close()
        assert again.applied == pipeline.tracker.applied and changed == 0
        assert pipeline.store.get("acme", paid.id) == final
    finally:
        pipeline.close()


def test_an_event_the_processor_marked_with_an_effect_opens_it_where_the_tracker_knows_no_such_effect(
        settings: Settings, tmp_path: Path) -> None:
    store = OutboxStore(open_database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}"))
    store.migrate()
    started = command("acme", "sub-9", start(5000))
    payload = SubscriptionStarted(customer_id="cust-9", plan="pro", monthly_price_cents=5000, currency="EUR")
    [event] = to_events(started, [payload], version=0, now=datetime.now(UTC))
    producer, delivered = Producer(producer_config(settings)), []
    producer.produce(topic_name(settings, Topic.EVENTS), key=started.key, value=CODEC.encode(event),
                     headers=[("keel-type", b"SubscriptionStarted"), (EFFECT_HEADER, b"crm")],
                     on_delivery=lambda error, message: delivered.append(message))
    assert producer.flush(10) == 0
    tracker = StatusTracker(store, settings)

    def opened() -> EffectRecord | None:
        tracker.run_once()
        return store.effect("acme", event.id)

    try:
        found = eventually(opened, "the header opens the effect")
    finally:
        tracker.close()
        store.db.close()
    [message] = delivered
    assert (found.provider, found.state, found.event_type, found.origin_command_id) == (
        "crm", EffectState.PENDING, "SubscriptionStarted", started.id)
    assert (found.event_partition, found.event_offset) == (message.partition(), message.offset())
