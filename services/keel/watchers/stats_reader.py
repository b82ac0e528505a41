"""Reading the stats watcher's table from its changelog topic, for ``keel stats``.

The changelog is the table's durable form: faust writes every update there and rebuilds
the table from it on restart. Reading it here, with confluent-kafka from the first to the
last offset of every partition (last record per key wins, a null value deletes), gives
the counts of all workers at once and works while no watcher is running; see
``keel.watchers.stats`` for why this beats the web view. The record layout is faust's:
the key is JSON ``[table key, [window start, window end]]``, the value JSON counts.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from keel.config import Settings
from keel.errors import DecodeError, InfraError
from keel.kafka.clients import consumer_config
from keel.kafka.reader import watermarks
from keel.watchers.stats import changelog_topic
from keel.watchers.stats_tally import Counts, StatsRow, minutes_since, summarise

Windows = dict[tuple[str, float], Counts]
METADATA_TIMEOUT_S = 10.0  # a dead broker should fail `keel stats` fast


def read_rows(
    settings: Settings, *, tenant: str | None = None, minutes: int | None = None,
    now: datetime | None = None,
) -> list[StatsRow]:
    """Counts per minute and tenant, oldest first: all kept windows, or the last ``minutes``."""
    since = None if minutes is None else minutes_since(minutes, now or datetime.now(UTC))
    return summarise(read_windows(settings), tenant=tenant, since=since)


def read_windows(settings: Settings, *, timeout_s: float = 30.0) -> Windows:
    """The stats table as ``(table key, window start) -> counts``, read from its changelog."""
    topic = changelog_topic(settings)
    consumer = Consumer(consumer_config(
        settings, f"{topic}.reader-{uuid.uuid4().hex[:8]}",  # never commits: leaves no group
        **{"enable.partition.eof": True, "logger": _librdkafka_logger()},
    ))
    try:
        partitions = _partitions(consumer, topic, METADATA_TIMEOUT_S)
        consumer.assign([TopicPartition(topic, p, low) for p, low in partitions.items()])
        return _read_to_end(consumer, set(partitions), timeout_s)
    except KafkaException as exc:
        raise InfraError(f"could not read {topic} from {settings.bootstrap_servers}: {exc}",
                         code="broker_unreachable") from exc
    finally:
        consumer.close()


def _librdkafka_logger() -> logging.Logger:
    """Where librdkafka's own lines go: nowhere. It logs every refused connection to stderr;
    the failure still reaches the user as an InfraError."""
    logger = logging.getLogger(f"{__name__}.librdkafka")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def _partitions(consumer: Consumer, topic: str, timeout_s: float) -> dict[int, int]:
    """Each non-empty partition of ``topic`` with its first offset."""
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise InfraError(
            f"topic {topic} does not exist yet; start the watcher with `keel watch stats`",
            code="stats_unavailable")
    found = {}
    for partition in metadata.partitions:
        low, high = watermarks(consumer, TopicPartition(topic, partition), timeout_s)
        if high > low:
            found[partition] = low
    return found


def _read_to_end(consumer: Consumer, pending: set[int], timeout_s: float) -> Windows:
    windows: Windows = {}
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            raise InfraError(f"reading the stats changelog took over {timeout_s:.0f}s",
                             code="stats_read_timeout")
        message = consumer.poll(0.5)
        if message is None:
            continue
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                pending.discard(message.partition())
                continue
            raise InfraError(f"reading the stats changelog failed: {error}", code="stats_read_failed")
        fold_record(windows, message.key(), message.value())
    return windows


def fold_record(windows: Windows, raw_key: bytes | None, raw_value: bytes | None) -> None:
    """Fold one changelog record into ``windows``: the latest value wins, null deletes."""
    if raw_key is None:
        return
    try:
        key, (start, _end) = json.loads(raw_key)
        slot = (str(key), float(start))
        value: Any = json.loads(raw_value) if raw_value is not None else None
        counts = Counts.from_json(value) if value is not None else None
    except (ValueError, TypeError, KeyError) as exc:
        raise DecodeError(f"a stats changelog record is not a counts window: {exc}") from exc
    if counts is None:
        windows.pop(slot, None)
    else:
        windows[slot] = counts
