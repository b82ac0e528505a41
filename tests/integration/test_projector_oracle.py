"""The exactly-once oracle: the projector is ``kill -9``-ed again and again while 50,000 events
(and aborted transactions) stream in; afterwards ClickHouse holds exactly the topic's records.

The projector runs as ``python -m keel.cli project --follow`` in its own process with its own
chDB path (a path belongs to one process), so the checks run through ``keel query`` too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.kafka.clients import transactional_producer_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from tests.integration.test_projector import subscription_story

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "keel.cli"]
EVENTS = 50_000
KILLS = 10
TRANSACTION = 1_000  # events per Kafka transaction; every 7th transaction is aborted


def event_values(count: int, seed: int) -> list[tuple[bytes, bytes]]:
    """``count`` distinct encoded events (key, value): a few real events, re-identified by byte
    substitution (ids and aggregate ids keep their length), so producing is not CPU-bound."""
    codec = EnvelopeCodec()
    templates = [e for tenant in ("acme", "globex", "initech") for e in subscription_story(tenant, "agg-000000")]
    encoded = [(codec.encode(e), str(e.id).encode()) for e in templates]
    rng = random.Random(seed)
    values = []
    for n in range(count):
        value, old_id = encoded[n % len(encoded)]
        aggregate = f"agg-{rng.randrange(10**6):06d}".encode()
        value = value.replace(old_id, str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode())
        value = value.replace(b"agg-000000", aggregate)
        tenant = templates[n % len(templates)].tenant_id.encode()
        values.append((tenant + b"/" + aggregate, value))
    return values


def produce_with_aborts(settings: Settings, committed: list[tuple[bytes, bytes]], pace_s: float) -> int:
    """Produce ``committed`` in transactions, with aborted transactions of junk between; returns aborts."""
    topic = topic_name(settings, Topic.EVENTS)
    producer = Producer(transactional_producer_config(settings, f"{settings.topic_prefix}-oracle"))
    producer.init_transactions()
    aborted_values = event_values(TRANSACTION, seed=99)
    aborts = 0
    for n, start in enumerate(range(0, len(committed), TRANSACTION)):
        if n % 7 == 3:
            producer.begin_transaction()
            for key, value in aborted_values:
                producer.produce(topic, value, key=key)
            producer.flush(30)
            producer.abort_transaction()
            aborts += 1
        producer.begin_transaction()
        for key, value in committed[start:start + TRANSACTION]:
            producer.produce(topic, value, key=key)
            producer.poll(0)
        producer.commit_transaction()
        time.sleep(pace_s)
    return aborts


def keel_query(env: dict[str, str], sql: str) -> list[list[object]]:
    done = subprocess.run([*CLI, "query", sql, "--all-tenants", "--format", "json", "--limit", str(10 * EVENTS)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows: list[list[object]] = json.loads(done.stdout)["rows"]
    return rows


def test_projector_killed_ten_times_during_50k_events_leaves_exactly_the_topic_in_clickhouse(
    settings: Settings, tmp_path: Path
) -> None:
    env = {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_DATA_DIR": str(settings.data_dir),
           "KEEL_TOPIC_PARTITIONS": str(settings.topic_partitions),
           "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
           "KEEL_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}", "KEEL_CLICKHOUSE_DATABASE": "oracle"}
    committed = event_values(EVENTS, seed=1)
    # ~50 transactions, one every ~0.7 s: the stream lasts longer than ten kill cycles
    producing = threading.Thread(target=produce_with_aborts, args=(settings, committed, 0.6))
    producing.start()
    rng = random.Random(7)
    kills_while_streaming = 0
    try:
        while producing.is_alive():
            follower = subprocess.Popen([*CLI, "project", "--follow"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(2.0, 3.5))  # start-up takes ~1.5 s: the kill lands while it projects
            follower.send_signal(signal.SIGKILL)
            follower.wait(30)
            kills_while_streaming += producing.is_alive()
    finally:
        producing.join(120)
    assert kills_while_streaming >= KILLS

    done = subprocess.run([*CLI, "project"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr

    codec = EnvelopeCodec()
    in_topic = {}
    for message in read_to_end(settings, topic_name(settings, Topic.EVENTS), timeout_s=60):
        event = codec.decode(message.value() or b"")
        in_topic[str(event.id)] = [message.partition(), message.offset(), event.tenant_id, event.aggregate_id,
                                   event.type, event.payload.model_dump(mode="json")]
    assert len(in_topic) == EVENTS  # the aborted transactions are invisible to read_committed
    rows = keel_query(env, "SELECT toString(event_id), _partition, _offset, tenant_id, aggregate_id, type, "
                           "payload FROM events ORDER BY _partition, _offset")
    assert len(rows) == EVENTS  # no duplicate row, even before any merge
    assert {str(r[0]): [*r[1:6], json.loads(str(r[6]))] for r in rows} == in_topic
    # The per-hour aggregate is fed by a materialized view in the same INSERT as `events`, but
    # not atomically with it: a kill between the two parts leaves it one batch short, which the
    # next start counts from `events`. `keel projections rebuild tenant_hourly` agrees.
    assert keel_query(env, "SELECT sum(events) FROM tenant_metrics") == [[EVENTS]]
    repaired = subprocess.run([*CLI, "projections", "rebuild", "tenant_hourly"], env=env, capture_output=True,
                              text=True, timeout=180)
    assert repaired.returncode == 0, repaired.stderr
    assert keel_query(env, "SELECT sum(events) FROM tenant_metrics") == [[EVENTS]]
