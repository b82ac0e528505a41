"""Processor snapshots on a real broker: a restart loads the latest checkpoint and folds only the
events after it, and a snapshot that cannot be read is skipped for a full fold, never trusted."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from keel.config import Settings
from keel.domain.envelope import Envelope
from keel.kafka.clients import producer_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.processor.snapshot_format import HEADER_SIZE
from keel.processor.state import PartitionState
from keel.processor.worker import CommandProcessor
from tests.helpers import command, refund, send, start

pytestmark = pytest.mark.integration

AGGREGATES = [f"sub-{i}" for i in range(12)]  # spread over every partition


def run(settings: Settings, instance: str, *, snapshot_events: int = 1,
        then: Callable[[CommandProcessor], None] | None = None) -> dict[int, PartitionState]:
    """A worker's partition states once it caught up (after ``then``, if given)."""
    worker = CommandProcessor(settings.model_copy(update={"processor_snapshot_events": snapshot_events}),
                              instance_id=instance)
    try:
        worker.run_until_caught_up()
        if then is not None:
            then(worker)
        return dict(worker.partitions)
    finally:
        worker.close()


def history(settings: Settings) -> list[Envelope]:
    """Three rounds of commands, each decided in its own batches: checkpoints land between them.

    Returns the first round's commands.
    """
    opened = [command("acme", a, start(5000)) for a in AGGREGATES]
    rounds = [opened, [command("acme", a, refund(100)) for a in AGGREGATES],
              [command("acme", a, refund(200)) for a in AGGREGATES[::2]] + opened[:3]]

    def decide_each_round(worker: CommandProcessor) -> None:
        for commands in rounds:
            send(settings, *commands)
            worker.run_until_caught_up()

    run(settings, "writer", then=decide_each_round)
    return opened


def full_fold(settings: Settings) -> dict[int, PartitionState]:
    return run(settings, "folder", snapshot_events=0)


def assert_same(loaded: dict[int, PartitionState], folded: dict[int, PartitionState]) -> None:
    assert loaded.keys() == folded.keys()
    for partition, state in loaded.items():
        assert state.aggregates == folded[partition].aggregates, f"partition {partition}"
        assert sorted_ids(state) == sorted_ids(folded[partition]), f"partition {partition}"


def sorted_ids(state: PartitionState) -> list[tuple[bytes, int]]:
    """Every remembered id with the minute it expires after."""
    return sorted((ids[index * 16:(index + 1) * 16], minute)
                  for ids, minutes in state.decided.packed() for index, minute in enumerate(minutes))


def snapshot_records(settings: Settings) -> dict[int, dict[bytes, bytes]]:
    found: dict[int, dict[bytes, bytes]] = {}
    for message in read_to_end(settings, topic_name(settings, Topic.SNAPSHOTS)):
        found.setdefault(message.partition() or 0, {})[message.key() or b""] = message.value() or b""
    return found


def test_a_restart_loads_the_checkpoint_and_folds_only_the_events_after_it(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    opened = history(settings)
    duplicates: list[int] = []

    def resend(worker: CommandProcessor) -> None:
        send(settings, opened[5])
        duplicates.append(worker.run_until_caught_up().duplicates)

    with caplog.at_level(logging.INFO, logger="keel.processor.snapshots"):
        loaded = run(settings, "restarted", then=resend)

    from_checkpoints = [r.getMessage() for r in caplog.records if "events from offset" in r.getMessage()]
    assert len(from_checkpoints) == settings.topic_partitions, caplog.text
    assert not any("from offset 0 " in line for line in from_checkpoints)
    assert duplicates == [1]  # its id came back with the checkpoint
    assert_same(loaded, full_fold(settings))
    assert sum(len(s.aggregates) for s in loaded.values()) == len(AGGREGATES)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "older schema", "deleted record"])
def test_an_unreadable_snapshot_is_skipped_for_a_full_fold(
        settings: Settings, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    history(settings)
    records = snapshot_records(settings)
    partition = next(p for p, found in records.items() if any(k.startswith(b"a/") for k in found))
    key = next(k for k in records[partition] if k.startswith(b"a/"))
    value = records[partition][key]
    damaged: bytes | None = {
        "flipped byte": value[:-1] + bytes([value[-1] ^ 0x20]),
        "truncated": value[:HEADER_SIZE + 3],
        "older schema": value[:3] + bytes(8) + value[11:],  # another fingerprint
        "deleted record": None,
    }[damage]
    producer = Producer(producer_config(settings))
    producer.produce(topic_name(settings, Topic.SNAPSHOTS), damaged, key, partition=partition)
    assert producer.flush(10) == 0

    with caplog.at_level(logging.WARNING, logger="keel.processor.snapshots"):
        loaded = run(settings, "restarted")
    assert f"snapshot of {topic_name(settings, Topic.SNAPSHOTS)}[{partition}] skipped" in caplog.text
    assert_same(loaded, full_fold(settings))

    # Its next checkpoint starts a new generation, which the next start-up reads again.
    send(settings, command("acme", AGGREGATES[0], refund(1)), *(command("acme", a, refund(1)) for a in AGGREGATES))
    run(settings, "rewriter")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keel.processor.snapshots"):
        reloaded = run(settings, "reloaded")
    assert "skipped" not in caplog.text
    assert_same(reloaded, full_fold(settings))
