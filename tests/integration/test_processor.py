"""The command processor on a real broker: decisions, dead letters, dedupe, restarts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.messages import CommandRejected
from support_desk.messages import CancelSubscription, SubscriptionStarted
from keel.domain.outcomes import event_id, to_events
from keel.kafka.clients import producer_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.processor.worker import CommandProcessor
from keel.sdk.producer import CommandProducer
from tests.helpers import command, events, refund, send, start

pytestmark = pytest.mark.integration


@pytest.fixture
def processor(settings: Settings) -> Iterator[CommandProcessor]:
    worker = CommandProcessor(settings, instance_id="test")
    yield worker
    worker.close()


def produce_raw(settings: Settings, value: bytes, key: bytes) -> None:
    producer = Producer(producer_config(settings))
    producer.produce(topic_name(settings, Topic.COMMANDS), value, key)
    assert producer.flush(10) == 0


def test_commands_of_two_tenants_become_their_events_in_order(
        settings: Settings, processor: CommandProcessor) -> None:
    acme = [command("acme", "sub-1", start()), command("acme", "sub-1", refund(9000)),
            command("acme", "sub-1", refund(2000)), command("acme", "sub-1", CancelSubscription(reason="x"))]
    globex = [command("globex", "sub-1", start(100, "USD")), command("globex", "sub-1", refund(100, "USD"))]
    send(settings, *acme, *globex)

    stats = processor.run_until_caught_up()

    assert (stats.commands, stats.events, stats.rejected) == (6, 6, 1)
    by_tenant = {t: [e for e in events(settings) if e.tenant_id == t] for t in ("acme", "globex")}
    assert [(e.type, e.version) for e in by_tenant["acme"]] == [
        ("SubscriptionStarted", 1), ("CommandRejected", None), ("RefundIssued", 2),
        ("SubscriptionCancelled", 3)]
    assert [(e.type, e.version) for e in by_tenant["globex"]] == [
        ("SubscriptionStarted", 1), ("RefundIssued", 2)]
    for cmd, event in zip(acme, by_tenant["acme"], strict=True):
        assert (event.id, event.causation_id, event.actor) == (event_id(cmd.id, 0), cmd.id, cmd.actor)
    rejection = by_tenant["acme"][1].payload
    assert isinstance(rejection, CommandRejected) and rejection.code == "refund_exceeds_paid"


def test_malformed_bytes_go_to_the_dlq_with_a_reason_and_processing_continues(
        settings: Settings, processor: CommandProcessor) -> None:
    produce_raw(settings, b"\x00not avro at all", b"acme/sub-1")
    send(settings, command("acme", "sub-1", start()))

    stats = processor.run_until_caught_up()

    assert (stats.dead_lettered, stats.events) == (1, 1)
    [dead] = list(read_to_end(settings, topic_name(settings, Topic.DLQ)))
    headers = {k: v.decode() for k, v in cast(list[tuple[str, bytes]], dead.headers() or [])}
    assert dead.value() == b"\x00not avro at all"
    assert headers["keel-error-code"] == "undecodable"
    assert headers["keel-source-topic"] == topic_name(settings, Topic.COMMANDS)
    assert "single-object" in headers["keel-error-reason"]
    assert [e.type for e in events(settings)] == ["SubscriptionStarted"]


def test_a_record_without_a_key_is_dead_lettered(settings: Settings, processor: CommandProcessor) -> None:
    producer = Producer(producer_config(settings))
    producer.produce(topic_name(settings, Topic.COMMANDS), EnvelopeCodec().encode(command("acme", "sub-1", start())))
    producer.flush(10)

    assert processor.run_until_caught_up().dead_lettered == 1
    [dead] = list(read_to_end(settings, topic_name(settings, Topic.DLQ)))
    assert dict(dead.headers() or [])["keel-error-code"] == b"key_mismatch"
    assert events(settings) == []


def test_a_command_keyed_for_another_tenant_is_dead_lettered_and_no_event_lands_under_that_key(
        settings: Settings, processor: CommandProcessor) -> None:
    producer = Producer(producer_config(settings))
    producer.produce(topic_name(settings, Topic.COMMANDS), EnvelopeCodec().encode(command("acme", "sub-1", start())),
                     b"globex/sub-1")
    producer.flush(10)
    send(settings, command("globex", "sub-1", start()))  # the victim's own aggregate of that id

    stats = processor.run_until_caught_up()
    assert (stats.dead_lettered, stats.events) == (1, 1)
    [dead] = list(read_to_end(settings, topic_name(settings, Topic.DLQ)))
    assert dict(dead.headers() or [])["keel-error-code"] == b"key_mismatch"
    written = list(read_to_end(settings, topic_name(settings, Topic.EVENTS)))
    assert [(m.key(), EnvelopeCodec().decode(m.value() or b"").tenant_id) for m in written] == [
        (b"globex/sub-1", "globex")]


def test_an_event_sent_as_a_command_is_dead_lettered(settings: Settings, processor: CommandProcessor) -> None:
    send(settings, command("acme", "sub-1", start()))
    processor.run_until_caught_up()
    [event] = events(settings)
    produce_raw(settings, EnvelopeCodec().encode(event), event.key.encode())

    assert processor.run_until_caught_up().dead_lettered == 1
    [dead] = list(read_to_end(settings, topic_name(settings, Topic.DLQ)))
    assert dict(dead.headers() or [])["keel-error-code"] == b"not_a_command"


def test_a_duplicate_command_id_is_acknowledged_and_not_executed_again(
        settings: Settings, processor: CommandProcessor) -> None:
    first = command("acme", "sub-1", start())
    issue = command("acme", "sub-1", refund(1000))
    send(settings, first, issue, issue)
    processor.run_until_caught_up()
    send(settings, issue)  # again, in a later batch

    stats = processor.run_until_caught_up()

    assert stats.duplicates == 2
    assert [e.type for e in events(settings)] == ["SubscriptionStarted", "RefundIssued"]


def test_a_new_worker_rebuilds_aggregate_state_from_the_events_topic(settings: Settings) -> None:
    first = CommandProcessor(settings, instance_id="first")
    opened = command("acme", "sub-1", start(5000))
    send(settings, opened)
    first.run_until_caught_up()
    first.close()

    second = CommandProcessor(settings, instance_id="second")
    try:
        send(settings, command("acme", "sub-1", refund(6000)), command("acme", "sub-1", refund(5000)), opened)
        stats = second.run_until_caught_up()
    finally:
        second.close()

    assert (stats.rejected, stats.duplicates) == (1, 1)
    assert [(e.type, e.version) for e in events(settings)] == [
        ("SubscriptionStarted", 1), ("CommandRejected", None), ("RefundIssued", 2)]
    assert isinstance(events(settings)[0].payload, SubscriptionStarted)


def test_a_later_worker_catches_up_when_some_partitions_have_only_old_commands(settings: Settings) -> None:
    aggregates = [f"sub-{i}" for i in range(12)]  # spread over every partition
    send(settings, *(command("acme", a, start()) for a in aggregates))
    first = CommandProcessor(settings, instance_id="first")
    first.run_until_caught_up()
    first.close()

    send(settings, command("acme", "sub-0", refund(100)))
    later = CommandProcessor(settings, instance_id="later")
    try:
        stats = later.run_until_caught_up(timeout_s=30)
    finally:
        later.close()

    assert (stats.commands, stats.events) == (1, 1)
    assert len(events(settings)) == len(aggregates) + 1


def test_a_worker_remembers_ids_for_the_dedupe_window_and_refuses_commands_older_than_it(
        settings: Settings) -> None:
    """An id whose events are older than the window is forgotten at load; a command created
    before the window is dead-lettered, since it could be a repeat of a forgotten one."""
    eight_days_ago = datetime.now(UTC) - timedelta(days=8)
    old = command("acme", "sub-old", start(), occurred_at=eight_days_ago)
    recent = command("acme", "sub-new", start())
    producer = Producer(producer_config(settings))  # what a worker wrote 8 days ago, and just now
    for cmd, decided_at in ((old, eight_days_ago), (recent, datetime.now(UTC))):
        payload = SubscriptionStarted(customer_id="c", plan="pro", monthly_price_cents=5000, currency="EUR")
        [event] = to_events(cmd, [payload], version=1, now=decided_at)
        producer.produce(topic_name(settings, Topic.EVENTS), EnvelopeCodec().encode(event), event.key.encode())
    assert producer.flush(10) == 0
    stale = command("acme", "sub-late", start(), occurred_at=eight_days_ago)  # never decided

    worker = CommandProcessor(settings.model_copy(update={"processor_dedupe_window_s": 7 * 24 * 3600.0}),
                              instance_id="windowed")
    try:
        assert [len(state.decided) for state in worker.partitions.values()] == []  # loads on assignment
        send(settings, old, recent, stale)
        stats = worker.run_until_caught_up()
        assert sum(len(state.decided) for state in worker.partitions.values()) == 1  # only the recent id
    finally:
        worker.close()

    assert (stats.duplicates, stats.dead_lettered, stats.events) == (1, 2, 0)
    dead = {EnvelopeCodec().decode(m.value() or b"").id: dict(m.headers() or [])["keel-error-code"]
            for m in read_to_end(settings, topic_name(settings, Topic.DLQ))}
    assert dead == {old.id: b"beyond_dedupe_window", stale.id: b"beyond_dedupe_window"}


def test_a_worker_counts_the_partitions_it_is_given_and_gives_back(settings: Settings) -> None:
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"loop": "processor", **labels}) or 0.0

    assigned = value("keel_partition_rebalances_total", change="assigned")
    revoked = value("keel_partition_rebalances_total", change="revoked")
    worker = CommandProcessor(settings, instance_id="counted")
    try:
        send(settings, command("acme", "sub-1", start()))
        worker.run_until_caught_up()
        assert value("keel_partition_rebalances_total", change="assigned") == assigned + 1
        assert value("keel_owned_partitions", member="counted") == settings.topic_partitions
    finally:
        worker.close()  # leaves the group: its partitions are handed back
    assert value("keel_partition_rebalances_total", change="revoked") == revoked + 1
    assert value("keel_owned_partitions", member="counted") == 0


def test_under_load_a_batch_gathers_for_the_linger_and_light_load_never_waits(settings: Settings) -> None:
    tuned = settings.model_copy(update={"processor_linger_s": 2.0, "processor_batch_size": 500})
    worker = CommandProcessor(tuned, instance_id="linger")
    try:
        send(settings, command("acme", "sub-first", start()))
        assert worker.run_until_caught_up().commands == 1

        send(settings, command("acme", "sub-light", start()))
        began = time.monotonic()
        assert worker.process_batch(timeout_s=5) == 1
        assert time.monotonic() - began < 1.0  # light load: decided without the linger

        with CommandProducer(settings) as producer:
            producer.send_many(command("acme", f"sub-{i}", start()) for i in range(20_000))
        time.sleep(3)  # fetched ahead: the worker then takes full batches back to back, thousands a second
        taken = 0
        while taken < 20_000:
            taken += worker.process_batch(timeout_s=5)

        def trickle() -> None:
            with CommandProducer(settings) as producer:
                for i in range(3):
                    time.sleep(0.3)
                    producer.send(command("acme", f"sub-late-{i}", start()))
                    producer.flush()

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            assert worker.process_batch(timeout_s=5) == 3  # under load: one batch gathered for the linger
        finally:
            sender.join()

        send(settings, command("acme", "sub-light-again", start()))
        began = time.monotonic()
        assert worker.process_batch(timeout_s=5) == 1  # three commands in two seconds: light load again
        assert time.monotonic() - began < 1.0
    finally:
        worker.close()
