"""The event projector: a read_committed consumer that writes the events topic into ClickHouse.

Partitions are assigned explicitly from the positions stored in the ``events`` table (no
consumer-group rebalancing, no reliance on Kafka's committed offsets, which are committed
after each batch only so lag tools can see progress). Records are decoded, batched and
inserted with a deterministic deduplication token; a crash anywhere leaves either the whole
batch with its positions in ClickHouse or none of it, and the next start resumes from
there. Bytes that do not decode are logged with the reason and counted, never fatal: the
processor already dead-letters bad commands, so an undecodable event is a bug to surface.

One projector owns the events table of a topic; run one per topic, not one per partition.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from clickhouse_connect.driver.client import Client
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.errors import InfraError, KeelError
from keel.kafka.clients import consumer_config
from keel.kafka.topics import Topic, topic_name
from keel.projector.rows import Position, event_row
from keel.projector.store import Batch, insert_batch, resume_offsets

log = logging.getLogger(__name__)

_POLL_S = 0.2
_METADATA_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ProjectorStats:
    """Counters since the projector was built: rows written, inserts, undecodable records."""

    rows: int = 0
    batches: int = 0
    undecodable: int = 0


class EventProjector:
    """Projects ``<prefix>.events`` into the ``events`` table of the client's database."""

    def __init__(
        self,
        settings: Settings,
        client: Client,
        *,
        codec: EnvelopeCodec | None = None,
        batch_size: int = 5000,
        linger_s: float = 1.0,
        on_batch: Callable[[ProjectorStats], None] | None = None,
    ) -> None:
        self.topic = topic_name(settings, Topic.EVENTS)
        self._client = client
        self._codec = codec or EnvelopeCodec()
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._on_batch = on_batch
        self._stats = ProjectorStats()
        self._consumer = Consumer(consumer_config(
            settings, f"{settings.topic_prefix}.projector.events", **{"enable.partition.eof": True}))

    @property
    def stats(self) -> ProjectorStats:
        """The counters so far."""
        return self._stats

    def catch_up(self, *, timeout_s: float = 300.0) -> int:
        """Project up to the end offsets seen at the start; returns the rows written."""
        start = resume_offsets(self._client, self.topic)
        targets = self._behind(start)
        if not targets:
            return 0
        self._assign({p: start.get(p, OFFSET_BEGINNING) for p in targets})
        deadline = time.monotonic() + timeout_s
        written = 0
        batch = Batch(self.topic)
        try:
            while targets:
                if time.monotonic() > deadline:
                    raise InfraError(
                        f"catching up {self.topic} did not finish within {timeout_s:.0f}s; "
                        f"partitions still behind: {sorted(targets)}", code="projector_timeout")
                for message in self._consumer.consume(self._batch_size - len(batch.rows), timeout=_POLL_S):
                    at_end = self._take(message, batch)
                    partition, offset = message.partition(), message.offset()
                    if partition is None or partition not in targets:
                        continue
                    if at_end or (message.error() is None and offset is not None
                                  and offset + 1 >= targets[partition]):
                        del targets[partition]  # later records wait for the next catch_up or run
                        self._consumer.pause([TopicPartition(self.topic, partition)])
                if len(batch.rows) >= self._batch_size or (batch.rows and not targets):
                    written += self._flush(batch)
                    batch = Batch(self.topic)
        finally:
            self._consumer.unassign()
        return written

    def run(self, stop: threading.Event) -> int:
        """Follow the topic until ``stop`` is set; returns the rows written.

        A batch is inserted when full or ``linger_s`` after its first record: under load
        that means full batches, when idle about one insert per ``linger_s``, the rate
        ClickHouse's parts like (not one insert per record).
        """
        start = resume_offsets(self._client, self.topic)
        self._assign({p: start.get(p, OFFSET_BEGINNING) for p in self._partitions()})
        written = 0
        batch = Batch(self.topic)
        opened = time.monotonic()
        try:
            while not stop.is_set():
                for message in self._consumer.consume(self._batch_size - len(batch.rows), timeout=_POLL_S):
                    if not batch.rows:
                        opened = time.monotonic()
                    self._take(message, batch)
                full = len(batch.rows) >= self._batch_size
                lingered = time.monotonic() - opened >= self._linger_s
                if batch.rows and (full or lingered):
                    written += self._flush(batch)
                    batch = Batch(self.topic)
            written += self._flush(batch)
        finally:
            self._consumer.unassign()
        return written

    def close(self) -> None:
        """Release the Kafka consumer; the ClickHouse client belongs to the caller."""
        self._consumer.close()

    def __enter__(self) -> EventProjector:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _partitions(self) -> list[int]:
        metadata = self._consumer.list_topics(self.topic, timeout=_METADATA_TIMEOUT_S).topics.get(self.topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise InfraError(f"topic {self.topic} does not exist; apply Keel's topic declarations first",
                             code="topic_missing")
        return sorted(metadata.partitions)

    def _behind(self, start: dict[int, int]) -> dict[int, int]:
        """The end offset of each partition that has records past ``start`` (read_committed)."""
        targets: dict[int, int] = {}
        for partition in self._partitions():
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=_METADATA_TIMEOUT_S, cached=False)
            if max(start.get(partition, low), low) < high:
                targets[partition] = high
        return targets

    def _assign(self, offsets: dict[int, int]) -> None:
        partitions = [TopicPartition(self.topic, p, o) for p, o in sorted(offsets.items())]
        self._consumer.assign(partitions)
        self._consumer.resume(partitions)  # librdkafka keeps a pause from the last catch_up across assign

    def _take(self, message: Message, batch: Batch) -> bool:
        """Add ``message`` to ``batch``; True when it marks the end of its partition."""
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return True
            if error.fatal():
                raise InfraError(f"the events consumer failed: {error.str()}", code="consumer_failed")
            log.warning("events consumer error", extra={"topic": self.topic, "error": error.str()})
            return False
        partition, offset = message.partition(), message.offset()
        assert partition is not None and offset is not None  # only error events lack a position
        position = Position(self.topic, partition, offset)
        try:
            event = self._codec.decode(message.value() or b"")
        except KeelError as exc:
            self._stats = _bump(self._stats, undecodable=1)
            log.error(
                "undecodable event at %s[%d]@%d skipped: %s", position.topic, position.partition,
                position.offset, exc,
                extra={"topic": position.topic, "partition": position.partition,
                       "offset": position.offset, "code": exc.code, "reason": exc.message},
            )
            return False
        batch.add(event_row(event, position), position)
        return False

    def _flush(self, batch: Batch) -> int:
        if not batch.rows:
            return 0
        insert_batch(self._client, batch)
        # Informational only: ClickHouse holds the positions the projector resumes from.
        self._consumer.commit(offsets=[TopicPartition(self.topic, s.partition, s.last + 1)
                                       for s in batch.ordered_spans], asynchronous=True)
        self._stats = _bump(self._stats, rows=len(batch.rows), batches=1)
        log.info("projected %d events (%s)", len(batch.rows), batch.token,
                 extra={"topic": self.topic, "rows": len(batch.rows), "token": batch.token})
        if self._on_batch is not None:
            self._on_batch(self._stats)
        return len(batch.rows)


def _bump(stats: ProjectorStats, *, rows: int = 0, batches: int = 0, undecodable: int = 0) -> ProjectorStats:
    return ProjectorStats(stats.rows + rows, stats.batches + batches, stats.undecodable + undecodable)
