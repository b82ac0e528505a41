"""``keel replay`` against the real broker: ranges, filters, every sink, resume, and the live-topic guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Message
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from fastavro import reader

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.kafka.clients import admin_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.replay.engine import ReplayJob, guard_target_topic, replay
from keel.replay.errors import ReplayError
from keel.replay.range import Bound, Filter
from keel.replay.sinks import AvroFileSink, JsonLinesSink, TableSink, TopicSink
from tests.integration.test_projector import produce, subscription_story

pytestmark = pytest.mark.integration

CODEC = EnvelopeCodec()
CLI = [sys.executable, "-m", "keel.cli"]


def job(settings: Settings, start: str = "beginning", end: str = "end", **filters: object) -> ReplayJob:
    return ReplayJob(topic=topic_name(settings, Topic.EVENTS), start=Bound.parse(start), end=Bound.parse(end),
                     filter=Filter(**filters), target="test")  # type: ignore[arg-type]


def jsonl_ids(path: Path) -> list[str]:
    return [json.loads(line)["event"]["id"] for line in path.read_text().splitlines()]


def by_partition(events: list[Envelope]) -> list[str]:
    """Event ids in the order a replay writes them within each partition (sorted for comparison)."""
    return sorted(str(e.id) for e in events)


def test_jsonl_replay_keeps_only_the_filtered_tenant(settings: Settings, tmp_path: Path) -> None:
    acme = [e for i in range(5) for e in subscription_story("acme", f"sub-{i}")]
    globex = [e for i in range(5) for e in subscription_story("globex", f"sub-{i}")]
    produce(settings, acme + globex)
    sink = JsonLinesSink(tmp_path / "acme.jsonl")

    progress = replay(settings, job(settings, tenant="acme"), sink)
    sink.close()

    assert (progress.read, progress.kept) == (len(acme) + len(globex), len(acme))
    assert sorted(jsonl_ids(tmp_path / "acme.jsonl")) == by_partition(acme)
    line = json.loads((tmp_path / "acme.jsonl").read_text().splitlines()[0])
    assert {"topic", "partition", "offset", "timestamp_ms", "event"} <= set(line)


def test_avro_replay_by_type_and_actor_writes_a_readable_container(settings: Settings, tmp_path: Path) -> None:
    events = [e for i in range(4) for e in subscription_story("acme", f"sub-{i}")]
    produce(settings, events)
    sink = AvroFileSink(tmp_path / "refunds.avro", block_records=2)

    replay(settings, job(settings, types=frozenset({"RefundIssued"}), actor="support-bot"), sink)
    sink.close()

    with (tmp_path / "refunds.avro").open("rb") as file:
        records = cast(list[dict[str, Any]], list(reader(file)))
    decoded = [CODEC.decode(r["value"]) for r in records]
    assert sorted(str(e.id) for e in decoded) == by_partition([e for e in events if e.type == "RefundIssued"])


def test_time_range_replays_only_what_was_written_after_the_start(settings: Settings, tmp_path: Path) -> None:
    before = subscription_story("acme", "sub-old")
    produce(settings, before)
    time.sleep(1.2)
    cut = datetime.now(UTC).isoformat()
    time.sleep(0.2)
    after = subscription_story("acme", "sub-new")
    produce(settings, after)
    sink = JsonLinesSink(tmp_path / "after.jsonl")

    replay(settings, job(settings, start=cut), sink)
    sink.close()

    assert sorted(jsonl_ids(tmp_path / "after.jsonl")) == by_partition(after)


@pytest.mark.parametrize(("start", "end", "code"), [
    ("2999-01-01T00:00:00Z", "end", "empty_range"),
    ("offset:10000", "end", "empty_range"),
    ("offset:5", "offset:1", "inverted_range"),
    ("2030-01-02T00:00:00Z", "2030-01-01T00:00:00Z", "inverted_range"),
])
def test_empty_or_inverted_ranges_are_refused_with_a_code(
    settings: Settings, tmp_path: Path, start: str, end: str, code: str
) -> None:
    produce(settings, subscription_story("acme", "sub-1"))
    sink = JsonLinesSink(tmp_path / "none.jsonl")

    with pytest.raises(ReplayError) as refused:
        replay(settings, job(settings, start=start, end=end), sink)
    sink.close()

    assert refused.value.code == code


class Interrupted(Exception):
    """Stands for Ctrl-C or a crash in the middle of a replay."""


class CrashingSink(JsonLinesSink):
    """Writes ``survive`` records, then dies like a killed process (nothing flushed or closed)."""

    def __init__(self, path: Path, survive: int) -> None:
        super().__init__(path)
        self.left = survive

    def write(self, message: Message, event: Envelope) -> None:
        if self.left == 0:
            raise Interrupted()
        self.left -= 1
        super().write(message, event)


def test_interrupted_replay_resumes_from_its_checkpoint_without_repeats(settings: Settings, tmp_path: Path) -> None:
    events = [e for i in range(60) for e in subscription_story(f"t{i % 2}", f"sub-{i}", emails=10)]
    produce(settings, events)
    out, checkpoint = tmp_path / "all.jsonl", tmp_path / "all.checkpoint.json"

    crashing = CrashingSink(out, survive=450)
    with pytest.raises(Interrupted):
        replay(settings, job(settings), crashing, checkpoint=checkpoint, checkpoint_every=100)
    crashing.close()  # the buffered lines past the checkpoint reach the file, as after a crash they might
    checkpointed = json.loads(checkpoint.read_text())["kept"]
    resumed = JsonLinesSink(out)
    replay(settings, job(settings), resumed, checkpoint=checkpoint, checkpoint_every=100)
    resumed.close()

    assert 300 <= checkpointed <= 450 < len(out.read_text().splitlines()) == len(events)
    ids = jsonl_ids(out)
    assert len(ids) == len(set(ids)) == len(events)


def test_a_checkpoint_of_another_job_is_refused(settings: Settings, tmp_path: Path) -> None:
    produce(settings, subscription_story("acme", "sub-1"))
    checkpoint = tmp_path / "c.json"
    sink = JsonLinesSink(tmp_path / "a.jsonl")
    replay(settings, job(settings, tenant="acme"), sink, checkpoint=checkpoint)
    sink.close()

    with pytest.raises(ReplayError) as refused:
        replay(settings, job(settings, tenant="globex"), JsonLinesSink(tmp_path / "b.jsonl"), checkpoint=checkpoint)

    assert refused.value.code == "checkpoint_mismatch"


def test_replay_to_a_staging_topic_and_into_a_table(settings: Settings, migrated: Client) -> None:
    events = [e for i in range(5) for e in subscription_story("acme", f"sub-{i}")]
    produce(settings, events + subscription_story("globex", "sub-9"))
    staging = f"{settings.topic_prefix}.staging"
    admin = AdminClient(admin_config(settings))
    admin.create_topics([NewTopic(staging, 3, 1)])[staging].result()

    to_topic = TopicSink(settings, staging)
    replay(settings, job(settings, tenant="acme"), to_topic)
    to_topic.close()
    to_table = TableSink(migrated, "acme_replay", topic_name(settings, Topic.EVENTS), batch_rows=7)
    replay(settings, job(settings, tenant="acme"), to_table)
    to_table.close()

    staged = [CODEC.decode(m.value() or b"") for m in read_to_end(settings, staging)]
    assert sorted(str(e.id) for e in staged) == by_partition(events)
    rows = migrated.query("SELECT toString(event_id) FROM acme_replay ORDER BY event_id").result_rows
    assert sorted(r[0] for r in rows) == by_partition(events)
    admin.delete_topics([staging])


def test_republishing_into_a_live_topic_needs_the_flag_and_a_confirmation(settings: Settings) -> None:
    live = topic_name(settings, Topic.COMMANDS)
    with pytest.raises(ReplayError) as refused:
        guard_target_topic(settings, live, allow_live=False)
    assert refused.value.code == "live_target"
    guard_target_topic(settings, f"{settings.topic_prefix}.staging", allow_live=False)

    produce(settings, subscription_story("acme", "sub-1"))
    env = {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
           "KEEL_TOPIC_PARTITIONS": str(settings.topic_partitions), "KEEL_DATA_DIR": str(settings.data_dir)}
    without_flag = subprocess.run([*CLI, "replay", "--to-topic", live], env=env, capture_output=True, text=True,
                                  timeout=60)
    wrong_name = subprocess.run([*CLI, "replay", "--to-topic", live, "--allow-live"], env=env,
                                input="keel.something-else\n", capture_output=True, text=True, timeout=60)

    assert without_flag.returncode == 1 and "live_target" in without_flag.stderr
    assert wrong_name.returncode == 1 and "not_confirmed" in wrong_name.stderr
    assert [m for m in read_to_end(settings, live)] == []


def test_cli_replays_a_tenant_to_a_jsonl_file(settings: Settings, tmp_path: Path) -> None:
    events = subscription_story("acme", "sub-1")
    produce(settings, events + subscription_story("globex", "sub-2"))
    env = {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
           "KEEL_TOPIC_PARTITIONS": str(settings.topic_partitions), "KEEL_DATA_DIR": str(tmp_path)}

    done = subprocess.run([*CLI, "replay", "--tenant", "acme", "--out", str(tmp_path / "acme.jsonl")], env=env,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert f"replayed {len(events)} of" in done.stdout
    assert sorted(jsonl_ids(tmp_path / "acme.jsonl")) == by_partition(events)
    assert not list((tmp_path / "replays").glob("*.json"))  # a finished replay leaves no checkpoint


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", None])
def test_an_unreadable_checkpoint_is_a_typed_error_naming_it(settings: Settings, tmp_path: Path,
                                                             content: str | None) -> None:
    produce(settings, subscription_story("acme", "sub-1"))
    checkpoint = tmp_path / "checkpoint.json"
    if content is None:
        checkpoint.mkdir()  # a folder where the file belongs
    else:
        checkpoint.write_text(content)
    with pytest.raises(ReplayError) as caught:
        replay(settings, job(settings), JsonLinesSink(tmp_path / "out.jsonl"), checkpoint=checkpoint)
    assert caught.value.code == ("checkpoint_mismatch" if content == "[1, 2]" else "checkpoint_unreadable")
    assert str(checkpoint) in caught.value.message
