"""Read a topic from the beginning to its current end, as ``read_committed`` sees it.

Used by the demo, the tests, and tools that need "everything committed so far". The end
of each partition is librdkafka's partition-EOF signal, which for a ``read_committed``
consumer is the last stable offset, so aborted or open transactions never leak in.
``watermarks`` reads a partition's bounds, waiting out a leader that is not serving yet.
On a secure broker a denied ACL raises ``AuthorizationDenied`` and a refused login
``AuthenticationFailed`` (at once, not after ``timeout_s``); other errors are librdkafka's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from keel.config import Settings
from keel.errors import InfraError
from keel.kafka.clients import loader_config
from keel.kafka.errors import KafkaWatch


def read_to_end(settings: Settings, topic: str, timeout_s: float = 30.0,
                starts: dict[int, int] | None = None) -> Iterator[Message]:
    """Every committed record of ``topic`` (from ``starts``' offset where it names a partition),
    partition by partition in offset order."""
    group = f"{settings.topic_prefix}.reader.{uuid.uuid4().hex}"
    config = loader_config(settings, group)
    watch = KafkaWatch(config)
    consumer = Consumer(watch.config(config))
    try:
        metadata = watch.metadata(consumer, topic, timeout_s).topics[topic]
        denied = watch.denied_topic(metadata, topic)
        if denied is not None:
            raise denied
        if metadata.error is not None:
            raise KafkaException(metadata.error)
        pending = set(metadata.partitions)
        consumer.assign([TopicPartition(topic, p, (starts or {}).get(p, OFFSET_BEGINNING)) for p in pending])
        deadline = time.monotonic() + timeout_s
        while pending:
            # consume() waits until the batch is full or the timeout ends: keep it short.
            batch = consumer.consume(10_000, timeout=0.2)
            watch.check()
            if not batch:
                if time.monotonic() > deadline:
                    raise InfraError(f"no end of {topic} partitions {sorted(pending)} within "
                                     f"{timeout_s:.0f}s", code="read_timeout")
                continue
            deadline = time.monotonic() + timeout_s
            for message in batch:
                error = message.error()
                if error is None:
                    yield message
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(message.partition())
                else:
                    denied_read = watch.translate(
                        error, resource=group if error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED else topic,
                        operation="READ")
                    if denied_read is not None:
                        raise denied_read
                    raise KafkaException(error)
    finally:
        consumer.close()


def record_headers(message: Message) -> list[tuple[str, bytes | None]]:
    """A consumed record's headers: librdkafka returns (name, bytes or None) pairs, never a dict."""
    return cast(list[tuple[str, bytes | None]], message.headers() or [])


# What a broker answers for a partition whose leader is not serving yet: right after the
# topic was created, or while leadership moves. Worth waiting for; anything else is not.
_LEADER_NOT_READY = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                               KafkaError.UNKNOWN_TOPIC_OR_PART})


def watermarks(consumer: Consumer, partition: TopicPartition, timeout_s: float) -> tuple[int, int]:
    """The low and high watermark of ``partition`` from the broker, waiting up to ``timeout_s``
    for a leader that is not serving it yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(partition, timeout=timeout_s, cached=False)
            return low, high
        except KafkaException as exc:
            if exc.args[0].code() not in _LEADER_NOT_READY or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
