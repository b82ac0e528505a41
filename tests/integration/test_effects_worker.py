"""The effect worker group against the real broker, with the processor deciding every outcome.

Effects of ``tests.effects_domain`` (cards charged by a handler that does what each charge's
``behaviour`` says, refunds that undo them) run through real processes: ``keel process``
decides the commands and the workers' outcome commands, ``keel effects run`` calls the
handlers. Most tests share one set of topics, processor and worker, each in a tenant of its
own; those that need the worker to start at a given moment (after a switch is thrown, after
an undo) stop and start it, and those that need workers of their own (one without the
handler, one killed with SIGKILL) get topics of their own.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from keel.config import PROJECT_ROOT, Settings
from keel.contracts.catalog import SCHEMA_ROOT, load_catalog
from keel.contracts.codec import EnvelopeCodec
from keel.domain.commands import RetryEffect, SetKillSwitch, SwitchScope
from keel.domain.effects import idempotency_key, outcome_command_id
from keel.domain.envelope import Actor, ActorKind, Envelope, Payload, new_command
from keel.domain.events import (
    CommandRejected,
    EffectCancelled,
    EffectFailed,
    EffectSucceeded,
    KillSwitchEngaged,
    ProviderBreakerClosed,
    ProviderBreakerOpened,
)
from keel.domain.governance.pipeline import CONTROLS_AGGREGATE
from keel.domain.messages import CORE_PAYLOADS
from keel.domain.outcomes import event_id
from keel.effects.progress import EffectReport, EffectState, WaitReason
from keel.kafka.clients import consumer_config, producer_config
from keel.kafka.reader import read_to_end, record_headers
from keel.kafka.topics import Topic, topic_name
from tests.effects_domain import DIR_ENV, DOWN, Charge, RefundCharge, calls, make_domain, write_schemas
from tests.plugins.trust import own_topics
from tests.processes import KeelProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

AGENT = Actor(kind=ActorKind.AGENT, id="pay-bot")
OPERATOR = Actor(kind=ActorKind.HUMAN, id="olga.ops")
WORKER = Actor(kind=ActorKind.SERVICE, id="keel-effects")
EMAIL = "ada@example.com"
WAIT_S = 30.0

T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    """One record of the events topic; ``event`` is decoded when it is one of Keel's own types."""

    type: str
    key: str
    partition: int
    offset: int
    value: bytes
    event: Envelope | None


class Keel:
    """A test's topics and the effects domain's folder, a processor, and effect workers, as processes."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings, self.folder = settings, folder
        write_schemas(folder)
        self.env = {"KEEL_DOMAINS": "tests.effects_domain", DIR_ENV: str(folder), "PYTHONPATH": str(PROJECT_ROOT),
                    "KEEL_EFFECTS_BREAKER_FAILURES": "3"}
        self.codec = EnvelopeCodec(load_catalog(SCHEMA_ROOT, [make_domain(folder)]))
        self.plain = EnvelopeCodec()
        self.processor = KeelProcess(["process", "--no-supervise", "--instance", f"p-{uuid.uuid4().hex[:8]}"],
                                     settings, folder / "processor.log", **self.env)
        self.worker = self.effect_worker("w1")

    def effect_worker(self, name: str, **env: str) -> KeelProcess:
        return KeelProcess(["effects", "run", "--no-supervise", "--instance", name], self.settings,
                           self.folder / f"effects-{name}.log", **{**self.env, **env})

    def send(self, tenant: str, aggregate: str, payload: Payload, actor: Actor = AGENT) -> Envelope:
        """Send a command and wait for Kafka's acknowledgement; returns it."""
        command = new_command(payload, tenant_id=tenant, aggregate_id=aggregate, actor=actor, on_behalf_of="cust-1")
        producer = Producer(producer_config(self.settings))
        producer.produce(topic_name(self.settings, Topic.COMMANDS), self.codec.encode(command), command.key.encode())
        assert producer.flush(15) == 0
        return command

    def charge(self, tenant: str, behaviour: str, aggregate: str = "card-1") -> uuid.UUID:
        """Send a charge; returns the id of its effect (its ``Charged`` event's id)."""
        command = self.send(tenant, aggregate, Charge(amount_cents=1200, email=EMAIL, behaviour=behaviour))
        return event_id(command.id, 0)

    def switch(self, tenant: str, scope: SwitchScope, target: str, engaged: bool) -> None:
        self.send(tenant, CONTROLS_AGGREGATE, SetKillSwitch(scope=scope, target=target, engaged=engaged,
                                                            reason="test"), OPERATOR)

    def records(self) -> list[Record]:
        found = []
        for message in read_to_end(self.settings, topic_name(self.settings, Topic.EVENTS)):
            headers = dict(record_headers(message))
            kind, value = (headers.get("keel-type") or b"").decode(), message.value() or b""
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None
            found.append(Record(kind, (message.key() or b"").decode(), partition, offset, value,
                                self.plain.decode(value) if kind in CORE_PAYLOADS else None))
        return found

    def events(self, tenant: str, *types: type[Payload]) -> list[Envelope]:
        """Keel's own events of ``tenant`` of the given types, in log order per partition."""
        names = {t.__name__ for t in types}
        return [r.event for r in self.records() if r.event is not None and r.type in names
                and r.event.tenant_id == tenant]

    def all_outcomes(self) -> dict[uuid.UUID, list[Envelope]]:
        """Every recorded outcome, by effect."""
        found: dict[uuid.UUID, list[Envelope]] = {}
        for record in self.records():
            if record.event is not None and isinstance(record.event.payload,
                                                       EffectSucceeded | EffectFailed | EffectCancelled):
                found.setdefault(record.event.payload.effect_id, []).append(record.event)
        return found

    def outcomes(self, effect_id: uuid.UUID) -> list[Envelope]:
        return self.all_outcomes().get(effect_id, [])

    def reports(self, effect_id: uuid.UUID) -> list[EffectReport]:
        reports = [EffectReport.model_validate_json(m.value() or b"")
                   for m in read_to_end(self.settings, topic_name(self.settings, Topic.EFFECTS))]
        return sorted((r for r in reports if r.effect_id == effect_id), key=lambda r: (r.generation, r.seq))

    def calls(self, effect_id: uuid.UUID) -> list[dict[str, Any]]:
        return [call for call in calls(self.folder) if call["effect_id"] == str(effect_id)]

    def wait_for(self, find: Callable[[], T | Literal[False] | None], what: str, timeout_s: float = WAIT_S) -> T:
        """Poll ``find`` until it returns something truthy, checking the processes stay alive."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for process in (self.processor, self.worker):
                if process.process is not None:
                    process.assert_alive()
            found = find()
            if found:
                return found
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")

    def settled(self, effect_id: uuid.UUID, count: int = 1) -> list[Envelope]:
        """Wait for ``count`` outcomes of ``effect_id`` and return them all."""
        return self.wait_for(lambda: (found := self.outcomes(effect_id)) and len(found) >= count and found,
                             f"{count} outcome(s) of effect {effect_id}")

    def waiting(self, effect_id: uuid.UUID, reason: WaitReason) -> EffectReport:
        return self.wait_for(lambda: next((r for r in self.reports(effect_id)
                                           if r.state is EffectState.WAITING and r.reason is reason), None),
                             f"effect {effect_id} reported waiting ({reason})")

    def committed(self) -> dict[int, int]:
        """The offsets the effect worker group committed on the events topic, by partition."""
        consumer = Consumer(consumer_config(self.settings, f"{self.settings.topic_prefix}.effects"))
        try:
            topic = topic_name(self.settings, Topic.EVENTS)
            asked = [TopicPartition(topic, p) for p in range(self.settings.topic_partitions)]
            return {tp.partition: tp.offset for tp in consumer.committed(asked, timeout=10)}
        finally:
            consumer.close()

    def stop(self) -> None:
        self.worker.stop()
        self.processor.stop()


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _recorded(keel: Keel, tenant: str, event_type: str, aggregate: str = "card-1") -> list[Record]:
    """The records of ``event_type`` on the tenant's ``aggregate``."""
    return [r for r in keel.records() if r.type == event_type and r.key == f"{tenant}/{aggregate}"]


@pytest.fixture(scope="module")
def shared(broker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keel]:
    with own_topics(broker_settings) as settings:
        keel = Keel(settings, tmp_path_factory.mktemp("effects"))
        keel.processor.start()
        keel.worker.start()
        try:
            yield keel
        finally:
            keel.stop()


@pytest.fixture
def keel(shared: Keel) -> Keel:
    """The shared platform, with its worker running."""
    if not shared.worker.alive():
        shared.worker.start()
    return shared


@pytest.fixture
def own(settings: Settings, tmp_path: Path) -> Iterator[Keel]:
    """A platform on this test's own topics; its processor runs, its workers are the test's to start."""
    keel = Keel(settings, tmp_path)
    keel.processor.start()
    try:
        yield keel
    finally:
        keel.stop()


def test_an_effect_runs_once_with_its_personal_fields_opened_and_its_success_is_recorded(keel: Keel) -> None:
    tenant = _tenant()
    effect = keel.charge(tenant, "ok")
    [done] = keel.settled(effect)
    assert isinstance(done.payload, EffectSucceeded)
    assert (done.payload.generation, done.payload.attempts, done.payload.provider) == (0, 1, "cards")
    assert json.loads(done.payload.result) == {"charge_id": f"ch_{str(effect)[-12:]}", "attempt": 1}
    # decided from the worker's outcome command: its deterministic id, its system actor
    assert done.causation_id == outcome_command_id(effect, 0) and done.actor == WORKER
    assert (done.tenant_id, done.aggregate_id) == (tenant, "card-1")

    [call] = keel.calls(effect)
    assert call["key"] == idempotency_key(effect) and call["attempt"] == 1
    assert call["email"] == EMAIL  # opened for the call...
    [charged] = _recorded(keel, tenant, "Charged")
    assert EMAIL.encode() not in charged.value and b"keel-enc:v1:" in charged.value  # ...sealed on the wire
    [running] = keel.reports(effect)
    assert (running.state, running.attempts, running.provider, running.event_type) == (
        EffectState.RUNNING, 1, "cards", "Charged")


def test_retryable_errors_are_retried_with_backoff_under_the_same_idempotency_key(keel: Keel) -> None:
    effect = keel.charge(_tenant(), "flaky")
    [done] = keel.settled(effect)
    assert isinstance(done.payload, EffectSucceeded) and done.payload.attempts == 3
    made = keel.calls(effect)
    assert [c["attempt"] for c in made] == [1, 2, 3] and {c["key"] for c in made} == {idempotency_key(effect)}
    reports = keel.reports(effect)
    assert [(r.state, r.reason, r.attempts) for r in reports] == [
        (EffectState.RUNNING, None, 1), (EffectState.WAITING, WaitReason.BACKOFF, 1),
        (EffectState.RUNNING, None, 2), (EffectState.WAITING, WaitReason.BACKOFF, 2),
        (EffectState.RUNNING, None, 3)]
    backoff = reports[1]
    assert backoff.next_attempt_at is not None and backoff.next_attempt_at > backoff.at
    assert backoff.detail is not None and "503 from the card network" in backoff.detail
    assert reports[2].detail is not None and "503" in reports[2].detail  # the last error travels on


def test_a_permanent_error_fails_the_effect_at_once(keel: Keel) -> None:
    effect = keel.charge(_tenant(), "decline")
    [failed] = keel.settled(effect)
    assert isinstance(failed.payload, EffectFailed)
    assert (failed.payload.code, failed.payload.attempts, failed.payload.error) == (
        "card_declined", 1, "the issuer declined the card")
    assert len(keel.calls(effect)) == 1


def test_a_handler_past_its_timeout_is_counted_a_timeout_and_retried(keel: Keel) -> None:
    effect = keel.charge(_tenant(), "hang")
    [done] = keel.settled(effect)
    assert isinstance(done.payload, EffectSucceeded) and done.payload.attempts == 2
    backoff = next(r for r in keel.reports(effect) if r.reason is WaitReason.BACKOFF)
    assert backoff.detail == "timeout: no answer within 0.5s"


def test_a_result_that_is_not_a_json_object_fails_as_bad_result_without_a_retry(keel: Keel) -> None:
    effect = keel.charge(_tenant(), "garbage")
    [failed] = keel.settled(effect)
    assert isinstance(failed.payload, EffectFailed) and failed.payload.code == "bad_result"
    assert len(keel.calls(effect)) == 1


def test_a_retried_effect_runs_as_its_next_generation_and_a_retry_pointing_elsewhere_fails(keel: Keel) -> None:
    tenant = _tenant()
    effect, other = keel.charge(tenant, "decline_once"), keel.charge(tenant, "decline", aggregate="card-2")
    keel.settled(effect)
    keel.settled(other)
    [charged] = _recorded(keel, tenant, "Charged")
    keel.send(tenant, "card-1", RetryEffect(effect_id=effect, reason="the customer fixed the card",
                                            event_partition=charged.partition, event_offset=charged.offset), OPERATOR)
    keel.send(tenant, "card-2", RetryEffect(effect_id=other, reason="try again", event_partition=charged.partition,
                                            event_offset=charged.offset), OPERATOR)  # that record is not its event

    first, again = keel.settled(effect, 2)
    assert isinstance(first.payload, EffectFailed) and isinstance(again.payload, EffectSucceeded)
    assert again.payload.generation == 1 and again.causation_id == outcome_command_id(effect, 1)
    assert {c["key"] for c in keel.calls(effect)} == {idempotency_key(effect)}
    _, lost = keel.settled(other, 2)
    assert isinstance(lost.payload, EffectFailed)
    assert (lost.payload.generation, lost.payload.code) == (1, "retry_event_not_found")


def test_a_switched_off_agent_or_command_type_holds_the_effect_until_released(keel: Keel) -> None:
    tenant = _tenant()
    keel.worker.stop()  # the effect must be recorded before the switches, and read after them
    effect = keel.charge(tenant, "ok")
    keel.wait_for(lambda: _recorded(keel, tenant, "Charged"), "the charge to be recorded")
    keel.switch(tenant, SwitchScope.AGENT, AGENT.id, True)
    keel.switch(tenant, SwitchScope.COMMAND_TYPE, "Charge", True)
    keel.wait_for(lambda: len(keel.events(tenant, KillSwitchEngaged)) == 2, "both switches")
    keel.worker.start()

    waiting = keel.waiting(effect, WaitReason.KILL_SWITCH)
    assert waiting.detail == f"agent {AGENT.id} is switched off" and waiting.attempts == 0
    keel.switch(tenant, SwitchScope.AGENT, AGENT.id, False)
    keel.wait_for(lambda: any(r.detail == "Charge is switched off" for r in keel.reports(effect)),
                  "the wait on the command type")
    assert keel.calls(effect) == [] and keel.outcomes(effect) == []
    keel.switch(tenant, SwitchScope.COMMAND_TYPE, "Charge", False)
    [done] = keel.settled(effect)
    assert isinstance(done.payload, EffectSucceeded) and len(keel.calls(effect)) == 1


def test_an_open_breaker_holds_effects_until_a_probe_succeeds(keel: Keel) -> None:
    tenant = _tenant()
    down = keel.folder / DOWN
    down.touch()
    try:
        effect = keel.charge(tenant, "down")
        [opened] = keel.wait_for(lambda: keel.events(tenant, ProviderBreakerOpened),
                                 "the breaker to open")
        assert isinstance(opened.payload, ProviderBreakerOpened) and opened.payload.provider == "cards"
        assert "3 attempts in a row failed" in opened.payload.reason
        assert opened.actor == WORKER and opened.aggregate_id == CONTROLS_AGGREGATE
        keel.waiting(effect, WaitReason.BREAKER)
    finally:
        down.unlink()
    [done] = keel.settled(effect)
    assert isinstance(done.payload, EffectSucceeded) and done.payload.attempts >= 4
    assert len(keel.calls(effect)) == done.payload.attempts
    reports = keel.reports(effect)
    waits = [r for r in reports if r.reason is WaitReason.BREAKER]
    probe = next(r for r in reports if r.state is EffectState.RUNNING and r.attempts == 4)
    assert probe.at - waits[0].at >= 1.5  # no call while open: the probe came a cooldown (2 s) later
    [closed] = keel.wait_for(lambda: keel.events(tenant, ProviderBreakerClosed),
                             "the breaker to close")
    assert isinstance(closed.payload, ProviderBreakerClosed) and closed.payload.provider == "cards"


def test_an_effect_undone_before_it_runs_is_cancelled_and_its_compensation_still_runs(keel: Keel) -> None:
    tenant = _tenant()
    keel.worker.stop()
    command = keel.send(tenant, "card-1", Charge(amount_cents=900, email=EMAIL, behaviour="ok"))
    effect = event_id(command.id, 0)
    keel.wait_for(lambda: _recorded(keel, tenant, "Charged"), "the charge to be recorded")
    keel.switch(tenant, SwitchScope.AGENT, AGENT.id, True)  # so that it waits, whenever the undo is read
    keel.wait_for(lambda: keel.events(tenant, KillSwitchEngaged), "the switch")
    keel.worker.start()
    keel.waiting(effect, WaitReason.KILL_SWITCH)
    refund = keel.send(tenant, "card-1", RefundCharge(undoes=command.id, reason="charged twice"), OPERATOR)

    [cancelled] = keel.settled(effect)
    assert isinstance(cancelled.payload, EffectCancelled) and cancelled.payload.code == "undone"
    # No worker can know that a crashed one did not attempt the charge: the refund's effect
    # runs, and the provider decides (here the test provider refunds whatever it is asked).
    [refunded] = keel.settled(event_id(refund.id, 0))
    assert isinstance(refunded.payload, EffectSucceeded)
    assert keel.calls(effect) == [] and len(keel.calls(event_id(refund.id, 0))) == 1


def test_a_worker_without_the_handler_holds_the_effect_until_a_worker_with_it_runs(own: Keel) -> None:
    tenant = _tenant()
    own.worker = own.effect_worker("bare", KEEL_DOMAINS="tests.effects_domain:without_effects")
    own.worker.start()
    effect = own.charge(tenant, "ok")
    waiting = own.waiting(effect, WaitReason.NO_HANDLER)
    assert waiting.event_type == "Charged" and waiting.provider == "cards" and waiting.tenant_id == tenant
    assert "no handler for Charged" in own.worker.output()
    own.worker.stop()  # it commits the offsets it may: not past the effect
    assert own.outcomes(effect) == [] and own.calls(effect) == []
    [charged] = _recorded(own, tenant, "Charged")
    assert own.committed()[charged.partition] == charged.offset

    own.worker = own.effect_worker("full")
    own.worker.start()
    [done] = own.settled(effect)
    assert isinstance(done.payload, EffectSucceeded) and len(own.calls(effect)) == 1


def test_a_killed_worker_loses_nothing_and_each_outcome_is_recorded_once(own: Keel) -> None:
    tenant = _tenant()
    effects = [own.charge(tenant, "slow", aggregate=f"card-{n % 3}") for n in range(24)]  # 8 a card, in order
    own.worker.start()
    own.wait_for(lambda: len(own.all_outcomes().keys() & set(effects)) >= 3, "the first outcomes")
    own.worker.kill()
    assert len(own.all_outcomes().keys() & set(effects)) < len(effects), "killed too late to show anything"
    own.worker.start()

    own.wait_for(lambda: own.all_outcomes().keys() >= set(effects), "every outcome", timeout_s=60)
    time.sleep(1.0)  # a duplicate outcome would be recorded by now
    outcomes = own.all_outcomes()
    for effect in effects:
        [done] = outcomes[effect]
        assert isinstance(done.payload, EffectSucceeded)
        made = own.calls(effect)
        assert made and {c["key"] for c in made} == {idempotency_key(effect)}
    assert own.events(tenant, CommandRejected) == []
    own.worker.stop()  # a stopped worker commits past everything settled
    committed = own.committed()
    assert all(committed[r.partition] > r.offset for r in own.records() if r.type == "Charged")
