"""The event projector against the real broker and embedded ClickHouse (chDB), no fakes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from confluent_kafka import Message, Producer

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, Authority, DelegationLink, Envelope, new_command
from support_desk.messages import CancelSubscription, IssueRefund, SendEmail, StartSubscription
from keel.domain.outcomes import to_events
from keel.domain.aggregate import EMPTY as INITIAL, evolve_aggregate as evolve
from keel.domain.deciding import decide
from keel.kafka.clients import producer_config, transactional_producer_config
from keel.kafka.topics import Topic, topic_name
from keel.projector.clickhouse import connect
from keel.projector.migrations import PROJECTIONS_DIR, apply_migrations
from keel.projector.projector import EventProjector, ProjectorStats
from keel.projector.rows import Position, event_row
from keel.projector.store import Batch, insert_batch, stored_offsets

pytestmark = pytest.mark.integration

CODEC = EnvelopeCodec()
CLI = [sys.executable, "-m", "keel.cli"]
AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
USER = Actor(kind=ActorKind.HUMAN, id="alice")


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    """A client on this test's database with the projections applied; dropped afterwards."""
    client = connect(settings)
    apply_migrations(client)
    yield client
    client.command(f"DROP DATABASE IF EXISTS {quote_identifier(settings.clickhouse_database)}")
    client.close()


def subscription_story(tenant: str, aggregate: str, emails: int = 1) -> list[Envelope]:
    """The events of one subscription: started, refunded, emailed, cancelled, one rejection."""
    commands = [
        StartSubscription(customer_id=f"cust-{aggregate}", plan="pro", monthly_price_cents=4900, currency="EUR"),
        IssueRefund(amount_cents=1000, currency="EUR", reason="late delivery", confidence=0.9),
        *[SendEmail(to_address=f"c{i}@example.com", template="refund", body="Sorry") for i in range(emails)],
        CancelSubscription(reason="customer asked"),
        IssueRefund(amount_cents=10**9, currency="EUR", reason="too much"),  # rejected: exceeds paid
    ]
    state, events = INITIAL, []
    for payload in commands:
        command = new_command(
            payload, tenant_id=tenant, aggregate_id=aggregate, actor=AGENT, on_behalf_of=f"cust-{aggregate}",
            delegation=(DelegationLink(actor=USER, reason="handle my ticket"),),
            authority=Authority(role="support", policy_rule="refunds.small", policy_version="3"),
            traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        produced = to_events(command, decide(command, state), version=state.version, now=datetime.now(UTC))
        for event in produced:
            state = evolve(state, event)
        events.extend(produced)
    return events


def produce(settings: Settings, events: list[Envelope], *, transactional: bool = False,
            abort: bool = False) -> dict[str, Position]:
    """Produce ``events`` keyed tenant/aggregate; returns where Kafka put each (by event id)."""
    topic = topic_name(settings, Topic.EVENTS)
    config = (transactional_producer_config(settings, f"{settings.topic_prefix}-test-tx")
              if transactional else producer_config(settings))
    producer = Producer(config)
    positions: dict[str, Position] = {}

    def delivered(err: object, message: Message) -> None:
        partition, offset = message.partition(), message.offset()
        assert err is None and partition is not None and offset is not None, err
        positions[str(CODEC.decode(message.value() or b"").id)] = Position(topic, partition, offset)

    if transactional:
        producer.init_transactions()
        producer.begin_transaction()
    for event in events:
        producer.produce(topic, CODEC.encode(event), key=event.key.encode(), on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(30) == 0  # written to the log before the transaction ends, as the processor does
    if transactional and abort:
        producer.abort_transaction()
    elif transactional:
        producer.commit_transaction()
    return positions


def stored(client: Client) -> dict[str, dict[str, object]]:
    """Every row of the events table by event id (duplicates would collide: counted separately)."""
    result = client.query("SELECT * FROM events ORDER BY _partition, _offset")
    return {str(row["event_id"]): row for row in result.named_results()}


def scalar(client: Client, sql: str) -> int:
    return int(client.query(sql).result_rows[0][0])


def count(client: Client, final: bool = False) -> int:
    return scalar(client, f"SELECT count() FROM events{' FINAL' if final else ''}")


def test_catch_up_projects_every_event_of_both_tenants_with_its_kafka_position(
    settings: Settings, client: Client
) -> None:
    events = subscription_story("acme", "sub-1") + subscription_story("globex", "sub-9", emails=3)
    positions = produce(settings, events)

    with EventProjector(settings, client) as projector:
        projected = projector.catch_up()

    rows = stored(client)
    assert projected == len(events) == count(client)
    assert set(rows) == {str(e.id) for e in events}
    for event in events:
        row = rows[str(event.id)]
        assert (row["tenant_id"], row["aggregate_id"], row["type"], row["version"]) == (
            event.tenant_id, event.aggregate_id, event.type, event.version)
        assert json.loads(str(row["payload"])) == event.payload.model_dump(mode="json")
        assert (row["actor_kind"], row["actor_id"], row["on_behalf_of"]) == ("agent", "support-bot", event.on_behalf_of)
        assert json.loads(str(row["delegation"])) == [{"actor": {"kind": "human", "id": "alice"},
                                                      "reason": "handle my ticket"}]
        assert (row["authority_role"], row["authority_policy_rule"], row["authority_policy_version"]) == (
            "support", "refunds.small", "3")
        assert (row["causation_id"], row["correlation_id"]) == (event.causation_id, event.correlation_id)
        assert row["occurred_at"] == event.occurred_at
        assert row["traceparent"] == event.traceparent
        position = positions[str(event.id)]
        assert (row["_topic"], row["_partition"], row["_offset"]) == (
            position.topic, position.partition, position.offset)
    rejected = [r for r in rows.values() if r["type"] == "CommandRejected"]
    assert len(rejected) == 2 and all(r["version"] is None for r in rejected)


def test_repeated_catch_up_and_a_fresh_projector_resume_from_stored_offsets_without_duplicates(
    settings: Settings, client: Client
) -> None:
    first = subscription_story("acme", "sub-1") + subscription_story("globex", "sub-2")
    second = subscription_story("globex", "sub-3")
    third = subscription_story("acme", "sub-4", emails=4)
    produce(settings, first)
    with EventProjector(settings, client) as projector:
        assert projector.catch_up() == len(first)
        assert projector.catch_up() == 0
        produce(settings, second)
        assert projector.catch_up(timeout_s=30) == len(second)

    produce(settings, third)
    fresh_client = connect(settings)  # nothing in memory survives: positions come from ClickHouse
    try:
        with EventProjector(settings, fresh_client) as fresh:
            assert fresh.catch_up(timeout_s=30) == len(third)
            assert fresh.catch_up() == 0
    finally:
        fresh_client.close()

    total = len(first) + len(second) + len(third)
    assert count(client) == total
    assert scalar(client, "SELECT uniqExact(event_id) FROM events") == total


def batch_of(topic: str, events: list[Envelope], *, traceparent: str | None = None) -> Batch:
    """A batch of ``events`` at offsets 0.. of partition 0, optionally re-mapped (another traceparent)."""
    batch = Batch(topic)
    for offset, event in enumerate(events):
        position = Position(topic, 0, offset)
        mapped = event if traceparent is None else event.model_copy(update={"traceparent": traceparent})
        batch.add(event_row(mapped, position), position)
    return batch


def test_same_batch_inserted_twice_is_deduplicated_by_its_token(settings: Settings, client: Client) -> None:
    topic = topic_name(settings, Topic.EVENTS)
    events = subscription_story("acme", "sub-1")
    batch = batch_of(topic, events)

    insert_batch(client, batch)
    insert_batch(client, batch)  # e.g. a retry after a lost acknowledgement
    # The same offsets mapped by a changed projector build: the token, not the bytes, decides.
    insert_batch(client, batch_of(topic, events, traceparent="00-" + "0" * 32 + "-" + "0" * 16 + "-00"))

    assert count(client) == len(events)


def test_event_projected_again_in_another_batch_collapses_under_final(settings: Settings, client: Client) -> None:
    topic = topic_name(settings, Topic.EVENTS)
    event = subscription_story("acme", "sub-1")[0]
    for offset in (0, 7):  # the same event read at two positions, so two different tokens
        batch = Batch(topic)
        batch.add(event_row(event, Position(topic, 0, offset)), Position(topic, 0, offset))
        insert_batch(client, batch)

    assert count(client) == 2
    assert count(client, final=True) == 1


def test_undecodable_record_is_counted_and_logged_and_does_not_stop_projection(
    settings: Settings, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    events = subscription_story("acme", "sub-1")
    produce(settings, events[:2])
    producer = Producer(producer_config(settings))
    producer.produce(topic_name(settings, Topic.EVENTS), b"not avro at all", key=b"acme/sub-1")
    assert producer.flush(30) == 0
    produce(settings, events[2:])

    with caplog.at_level(logging.ERROR, logger="keel.projector"), EventProjector(settings, client) as projector:
        assert projector.catch_up() == len(events)

    assert projector.stats.undecodable == 1
    assert count(client) == len(events)
    assert any("undecodable" in r.getMessage() and "bad magic" in r.getMessage() for r in caplog.records)


def test_events_of_an_aborted_transaction_are_never_projected(settings: Settings, client: Client) -> None:
    committed = subscription_story("acme", "sub-1")
    aborted = subscription_story("globex", "sub-2")
    produce(settings, committed, transactional=True)
    produce(settings, aborted, transactional=True, abort=True)

    with EventProjector(settings, client) as projector:
        assert projector.catch_up(timeout_s=60) == len(committed)

    assert set(stored(client)) == {str(e.id) for e in committed}


def test_catch_up_inserts_in_batches_of_at_least_the_batch_size(settings: Settings, client: Client) -> None:
    events = [e for i in range(40) for e in subscription_story(f"tenant-{i % 2}", f"sub-{i}", emails=60)]
    produce(settings, events)
    sizes: list[int] = []
    seen = ProjectorStats()

    def record(stats: ProjectorStats) -> None:
        nonlocal seen
        sizes.append(stats.rows - seen.rows)
        seen = stats

    with EventProjector(settings, client, batch_size=1000, on_batch=record) as projector:
        assert projector.catch_up() == len(events)

    assert sum(sizes) == len(events) > 2000
    assert all(size >= 1000 for size in sizes[:-1]), sizes


def test_run_follows_new_events_until_stopped(settings: Settings, client: Client) -> None:
    stop = threading.Event()
    result: list[int] = []
    with EventProjector(settings, client, linger_s=0.2) as projector:
        follower = threading.Thread(target=lambda: result.append(projector.run(stop)))
        follower.start()
        try:
            events = subscription_story("acme", "sub-1") + subscription_story("globex", "sub-2")
            produce(settings, events)
            deadline = time.monotonic() + 30
            while projector.stats.rows < len(events) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            follower.join(30)

    assert not follower.is_alive()
    assert result == [len(events)]
    assert set(stored(client)) == {str(e.id) for e in events}


def test_projector_killed_mid_stream_resumes_without_gaps_or_duplicates(
    settings: Settings, tmp_path: Path
) -> None:
    # Own processes and their own chDB path: a chDB path belongs to one process at a time.
    env = {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_DATA_DIR": str(settings.data_dir),
           "KEEL_TOPIC_PARTITIONS": str(settings.topic_partitions),
           "KEEL_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}", "KEEL_CLICKHOUSE_DATABASE": "keel"}
    events = [e for i in range(150) for e in subscription_story(f"tenant-{i % 3}", f"sub-{i}", emails=20)]
    follower = subprocess.Popen([*CLI, "project", "--follow"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        produce(settings, events[: len(events) // 2])
        time.sleep(3)  # let it project part of the stream
        producing = threading.Thread(target=produce, args=(settings, events[len(events) // 2:]))
        producing.start()
        time.sleep(0.5)
        follower.send_signal(signal.SIGKILL)
        producing.join(60)
    finally:
        follower.kill()
        follower.wait(30)

    done = subprocess.run([*CLI, "project"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = subprocess.run([*CLI, "query", "SELECT count(), uniqExact(event_id) FROM events", "--all-tenants",
                             "--format", "json"], env=env, check=True, capture_output=True, text=True, timeout=60)
    assert json.loads(answer.stdout)["rows"] == [[len(events), len(events)]]


def test_an_aggregate_a_crash_left_short_is_counted_whole_at_the_next_start(
    settings: Settings, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    first = [e for i in range(12) for e in subscription_story(f"t{i % 2}", f"sub-{i}")]
    second = [e for i in range(12, 30) for e in subscription_story(f"t{i % 2}", f"sub-{i}", emails=3)]
    produce(settings, first)
    with EventProjector(settings, client) as projector:
        projector.catch_up()
    # The crash: `events` stored a batch, its materialized view never ran.
    client.command("DETACH TABLE tenant_hourly_mv")
    placed = produce(settings, second)
    with EventProjector(settings, client) as projector:
        projector.catch_up()
    client.command("ATTACH TABLE tenant_hourly_mv")
    totals = "SELECT tenant_id, type, sum(events), sum(amount_cents) FROM tenant_metrics GROUP BY ALL ORDER BY ALL"
    from_events = ("SELECT tenant_id, type, count(), sum(JSONExtractInt(payload, 'amount_cents')) FROM events "
                   "GROUP BY ALL ORDER BY ALL")
    assert int(client.query("SELECT sum(events) FROM tenant_metrics").result_rows[0][0]) == len(first)

    with caplog.at_level(logging.WARNING, logger="keel.projector.aggregates"):
        with EventProjector(settings, client) as projector:
            assert projector.catch_up() == 0  # nothing new in Kafka: the repair reads events
    assert client.query(totals).result_rows == client.query(from_events).result_rows
    assert int(client.query("SELECT sum(events) FROM tenant_metrics").result_rows[0][0]) == len(first) + len(second)
    repaired = {getattr(r, "partition") for r in caplog.records if r.getMessage().startswith("tenant_hourly lacked")}
    assert repaired == {position.partition for position in placed.values()}

    with EventProjector(settings, client) as projector:  # a whole aggregate is left alone
        projector.catch_up()
    assert client.query(totals).result_rows == client.query(from_events).result_rows


def test_upgrading_a_projected_database_gives_tenant_hourly_its_positions(
    settings: Settings, tmp_path: Path
) -> None:
    legacy = tmp_path / "projections"
    shutil.copytree(PROJECTIONS_DIR, legacy)
    for path in legacy.glob("*/*.sql"):
        if int(path.name[:3]) > 10:  # before tenant_hourly stored positions
            path.unlink()
    events = [e for i in range(20) for e in subscription_story(f"t{i % 2}", f"sub-{i}")]
    client = connect(settings)
    try:
        apply_migrations(client, legacy)
        placed = produce(settings, events)
        batch = Batch(topic_name(settings, Topic.EVENTS))  # as the projector of that time wrote them
        for event in events:
            batch.add(event_row(event, placed[str(event.id)]), placed[str(event.id)])
        insert_batch(client, batch)
        before = client.query("SELECT * FROM tenant_metrics ORDER BY ALL").result_rows

        applied = apply_migrations(client).applied

        assert [name.split("/")[1][:3] for name in applied] == ["011", "012", "013", "014", "015"]
        assert client.query("SELECT * FROM tenant_metrics ORDER BY ALL").result_rows == before
        topic = topic_name(settings, Topic.EVENTS)
        assert stored_offsets(client, topic, "tenant_hourly") == stored_offsets(client, topic)
    finally:
        client.command(f"DROP DATABASE IF EXISTS {quote_identifier(settings.clickhouse_database)}")
        client.close()
