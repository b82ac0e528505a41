"""The native (engine-decoded) insert path: the rows the Python path gives, the fallback, the commands topic."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import cast

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer

from keel.config import Settings
from keel.contracts.codec import HEADER_SIZE, EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, new_command
from support_desk.messages import IssueRefund
from keel.kafka.clients import producer_config
from keel.kafka.topics import Topic, topic_name
from keel.projector.native import NativeInserter
from keel.projector.projector import EventProjector
from tests.integration.test_projector import produce, subscription_story

pytestmark = pytest.mark.integration

COLUMNS = ("tenant_id, aggregate_id, version, event_id, type, schema_version, actor_kind, actor_id, on_behalf_of, "
           "authority_role, authority_grant, authority_policy_rule, authority_policy_version, authority_approval_id, "
           "expected_version, causation_id, correlation_id, occurred_at, traceparent, _topic, _partition, _offset")


def test_native_and_python_paths_write_the_same_rows(settings: Settings, migrated: Client) -> None:
    events = [e for i in range(20) for e in subscription_story(f"t{i % 2}", f"sub-{i}", emails=2)]
    produce(settings, events)
    migrated.command("CREATE TABLE events_python AS events")

    with EventProjector(settings, migrated, native=True) as native:
        assert native.catch_up() == len(events)
    with EventProjector(settings, migrated, native=False, table="events_python") as python:
        assert python.catch_up() == len(events)

    def rows(table: str) -> list[tuple[object, ...]]:
        return cast(list[tuple[object, ...]], migrated.query(
            f"SELECT {COLUMNS}, delegation, payload FROM {table} ORDER BY _partition, _offset").result_rows)

    native_rows, python_rows = rows("events"), rows("events_python")
    assert [r[:-2] for r in native_rows] == [r[:-2] for r in python_rows]
    assert [[json.loads(str(v)) for v in r[-2:]] for r in native_rows] == \
        [[json.loads(str(v)) for v in r[-2:]] for r in python_rows]


def test_a_corrupt_body_makes_the_batch_fall_back_to_python_and_is_skipped(
    settings: Settings, migrated: Client, caplog: pytest.LogCaptureFixture
) -> None:
    events = subscription_story("acme", "sub-1")
    good = EnvelopeCodec().encode(events[0])
    producer = Producer(producer_config(settings))
    producer.produce(topic_name(settings, Topic.EVENTS), good[:HEADER_SIZE] + b"\xff" * 40, key=b"acme/sub-1")
    assert producer.flush(30) == 0
    produce(settings, events)

    with caplog.at_level(logging.WARNING, logger="keel.projector"), \
            EventProjector(settings, migrated, native=True) as projector:
        assert projector.catch_up() == len(events)

    assert projector.stats.undecodable == 1
    assert int(migrated.query("SELECT count() FROM events").result_rows[0][0]) == len(events)
    assert any("native insert" in r.getMessage() for r in caplog.records)


def test_commands_topic_is_projected_into_the_commands_table(settings: Settings, migrated: Client) -> None:
    codec = EnvelopeCodec()
    commands = [new_command(IssueRefund(amount_cents=100 + i, currency="EUR", reason="r"), tenant_id="acme",
                            aggregate_id=f"sub-{i}", actor=Actor(kind=ActorKind.AGENT, id="bot")) for i in range(25)]
    producer = Producer(producer_config(settings))
    for command in commands:
        producer.produce(topic_name(settings, Topic.COMMANDS), codec.encode(command), key=command.key.encode())
    assert producer.flush(30) == 0

    with EventProjector(settings, migrated, source=Topic.COMMANDS) as projector:
        assert projector.catch_up() == len(commands)

    rows = cast(list[tuple[uuid.UUID, str, datetime, str]], migrated.query(
        "SELECT command_id, command_type, submitted_at, status FROM command_lifecycle").result_rows)
    assert sorted(rows) == sorted((c.id, "IssueRefund", c.occurred_at, "submitted") for c in commands)


def test_the_native_path_leaves_no_schema_cache_entry_behind(settings: Settings, migrated: Client) -> None:
    """Each batch file is read once; a cache entry per file grew the projector for its first 4,096 batches."""
    events = [e for i in range(6) for e in subscription_story("t0", f"sub-{i}")]
    produce(settings, events)
    with EventProjector(settings, migrated, native=True, batch_size=4) as native:
        assert native.catch_up() == len(events)
    assert migrated.command(
        "SELECT count() FROM system.schema_inference_cache WHERE source LIKE '%native-scratch%'") == 0


def test_scratch_folders_of_processes_that_no_longer_run_are_removed_and_ours_goes_at_close(tmp_path: Path) -> None:
    root = tmp_path / "native-scratch"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    killed = root / f"{ended.stdout.strip()}-abc123"  # as a SIGKILLed projector leaves it, a batch file inside
    killed.mkdir(parents=True)
    (killed / "batch.avro").write_bytes(b"x" * 1000)
    alive = root / f"{os.getppid()}-def456"  # our parent runs: not ours to remove
    alive.mkdir()
    inserter = NativeInserter(EnvelopeCodec(), root)
    assert not killed.exists() and alive.is_dir()
    [ours] = [folder for folder in root.iterdir() if folder != alive]
    assert ours.name.startswith(f"{os.getpid()}-")
    inserter.close()
    assert sorted(root.iterdir()) == [alive]
