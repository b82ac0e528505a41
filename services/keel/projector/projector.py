"""The projector: a read_committed consumer that writes a log topic (events, commands) into ClickHouse.

Partitions are assigned explicitly from the positions stored in the projection table (no
consumer-group rebalancing, no reliance on Kafka's committed offsets, which are committed
after each batch only so lag tools can see progress). Records are batched and inserted
with a deterministic deduplication token (on chDB the engine itself decodes them, see
``keel.projector.native``); a crash anywhere leaves either the whole batch with its
positions in ClickHouse or none of it, and the next start resumes from there, after
counting into the aggregates any batch their materialized views missed
(``keel.projector.aggregates``). Personal fields stay ciphertext, except values sealed under
a key the key store says is erased, written as ``⟨erased⟩`` (``keel.trust.erased``): a
rebuild, or a projector behind an erasure, does not bring them back. Bytes that
do not decode are logged with the reason and counted, never fatal: the processor already
dead-letters bad commands, so an undecodable event is a bug to surface.

One projector owns the table of a topic (``events`` for ``<prefix>.events``, ``commands`` for
``<prefix>.commands``); run one per topic, not one per partition.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from keel.bootstrap import known_erasures
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.errors import ConfigError, InfraError, KeelError
from keel.kafka.clients import BATCHED_FETCH, consumer_config
from keel.kafka.errors import topic_partitions
from keel.kafka.reader import record_headers, watermarks
from keel.kafka.topics import Topic, topic_name
from keel.observability import tracing
from keel.observability.batches import LoopMetrics
from keel.observability.lag import lag_config
from keel.observability.metrics import PROJECTED, PROJECTION_LAG, UNDECODABLE
from keel.projector.aggregates import repair_aggregates
from keel.projector.native import NativeBatch, NativeInserter
from keel.projector.rows import EVENTS_TABLE, Position, event_row
from keel.projector.spans import projected, sampled
from keel.projector.store import Batch, insert_batch, stored_offsets
from keel.trust.erased import Erasures

log = logging.getLogger(__name__)

PROJECTED_TOPICS = (Topic.EVENTS, Topic.COMMANDS)

_POLL_S = 0.2
_METADATA_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ProjectorStats:
    """Counters since the projector was built: rows written, inserts, undecodable records."""

    rows: int = 0
    batches: int = 0
    undecodable: int = 0


class EventProjector:
    """Projects ``<prefix>.<source>`` into the table of the same name in the client's database."""

    def __init__(
        self,
        settings: Settings,
        client: Client,
        *,
        codec: EnvelopeCodec | None = None,
        batch_size: int = 20_000,
        linger_s: float | None = None,
        on_batch: Callable[[ProjectorStats], None] | None = None,
        source: Topic = Topic.EVENTS,
        table: str | None = None,
        native: bool | None = None,
        erasures: Erasures | None = None,
    ) -> None:
        if source not in PROJECTED_TOPICS:
            raise ConfigError(f"the {source.value} topic has no projection table", code="unknown_view")
        self.topic = topic_name(settings, source)
        self.table = table or source.value  # another table: a rebuild's shadow
        self._client = client
        self._codec = codec or EnvelopeCodec()
        # the engine decodes batches itself where it can read this process's files (chDB)
        use_native = settings.analytics_dsn.startswith("chdb:") if native is None else native
        self._native = NativeInserter(self._codec, settings.data_dir / "native-scratch") if use_native else None
        self._batch_size = batch_size
        self._linger_s = settings.projector_linger_s if linger_s is None else linger_s
        self._on_batch = on_batch
        self._stats = ProjectorStats()
        self._stats_lock = threading.Lock()
        group = f"{settings.topic_prefix}.projector.{source.value}"
        self._config = consumer_config(settings, group, **{"enable.partition.eof": True, **BATCHED_FETCH})
        self._consumer = Consumer({**self._config, **lag_config(settings, group)} if table is None else self._config)
        view = source.value if table is None else "rebuild"  # a rebuild's shadow tables: one label
        self._metrics = LoopMetrics(f"projector.{view}")
        self._rows, self._lag, self._bad = PROJECTED.labels(view), PROJECTION_LAG.labels(view), UNDECODABLE.labels(view)
        self._release_erasures: Callable[[], None] = lambda: None
        if erasures is None:  # the configured key store's tombstones, opened last: close() releases them
            erasures, self._release_erasures = known_erasures(settings)
        self._erasures = erasures
        self._tracing = tracing.enabled()

    @property
    def stats(self) -> ProjectorStats:
        """The counters so far."""
        return self._stats

    def catch_up(self, *, timeout_s: float = 300.0) -> int:
        """Project up to the end offsets seen at the start; returns the rows written."""
        start = self._resume()
        targets = self._behind(start)
        if not targets:
            return 0
        self._assign({p: start.get(p, OFFSET_BEGINNING) for p in targets})
        deadline = time.monotonic() + timeout_s
        lane = _InsertLane(self._insert, self._stored)
        batch = self._batch()
        try:
            while targets:
                if time.monotonic() > deadline:
                    raise InfraError(
                        f"catching up {self.topic} did not finish within {timeout_s:.0f}s; "
                        f"partitions still behind: {sorted(targets)}", code="projector_timeout")
                for message in self._consumer.consume(self._batch_size - len(batch), timeout=_POLL_S):
                    at_end = self._take(message, batch)
                    partition, offset = message.partition(), message.offset()
                    if partition is None or partition not in targets:
                        continue
                    if at_end or (message.error() is None and offset is not None
                                  and offset + 1 >= targets[partition]):
                        del targets[partition]  # later records wait for the next catch_up or run
                        self._consumer.pause([TopicPartition(self.topic, partition)])
                lane.poll()
                if len(batch) >= self._batch_size or (len(batch) > 0 and not targets):
                    lane.submit(batch)
                    batch = self._batch()
            return lane.wait()
        finally:
            lane.close()
            self._consumer.unassign()

    def run(self, stop: threading.Event) -> int:
        """Follow the topic until ``stop`` is set; returns the rows written.

        A batch is inserted when full or ``linger_s`` after its first record: under load
        that means full batches (thousands of rows), while records trickle in at most one
        insert per ``linger_s``, never one insert per record. Inserting runs beside reading
        (``_InsertLane``), so a slow insert does not stall the consumer.
        """
        start = self._resume()
        self._assign({p: start.get(p, OFFSET_BEGINNING) for p in self._partitions()})
        lane = _InsertLane(self._insert, self._stored)
        batch = self._batch()
        opened = time.monotonic()
        try:
            while not stop.is_set():
                messages = self._consumer.consume(self._batch_size - len(batch), timeout=_POLL_S)
                for message in messages:
                    if not len(batch):
                        opened, batch.opened_at = time.monotonic(), time.time()
                    self._take(message, batch)
                if messages:
                    batch.newest_ms = max(batch.newest_ms, messages[-1].timestamp()[1])
                elif not len(batch) and lane.idle:
                    self._lag.set(0)  # read to the end, and all of it stored
                lane.poll()
                full = len(batch) >= self._batch_size
                lingered = time.monotonic() - opened >= self._linger_s
                if len(batch) and (full or lingered):
                    lane.submit(batch)
                    batch = self._batch()
            lane.submit(batch)
            return lane.wait()
        finally:
            lane.close()
            self._consumer.unassign()

    def close(self) -> None:
        """Release the Kafka consumer and the key store; the ClickHouse client belongs to the caller."""
        self._consumer.close()
        if self._native is not None:
            self._native.close()
        self._release_erasures()

    def __enter__(self) -> EventProjector:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _resume(self) -> dict[int, int]:
        """The next offset to read per partition, once the aggregates fed by ``events`` are whole."""
        stored = stored_offsets(self._client, self.topic, self.table)
        if self.table == EVENTS_TABLE:  # not a rebuild's shadow: no view reads that
            repair_aggregates(self._client, self.topic, stored)
        return {partition: offset + 1 for partition, offset in stored.items()}

    def _partitions(self) -> list[int]:
        partitions = topic_partitions(self._consumer, self._config, self.topic, _METADATA_TIMEOUT_S)
        if not partitions:
            raise InfraError(f"topic {self.topic} does not exist; apply Keel's topic declarations first",
                             code="topic_missing")
        return partitions

    def _behind(self, start: dict[int, int]) -> dict[int, int]:
        """The end offset of each partition that has records past ``start`` (read_committed)."""
        targets: dict[int, int] = {}
        for partition in self._partitions():
            low, high = watermarks(self._consumer, TopicPartition(self.topic, partition), _METADATA_TIMEOUT_S)
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
                raise InfraError(f"the {self.table} consumer failed: {error.str()}", code="consumer_failed")
            log.warning("projector consumer error", extra={"topic": self.topic, "error": error.str()})
            return False
        partition, offset = message.partition(), message.offset()
        assert partition is not None and offset is not None  # only error events lack a position
        if self._tracing and sampled(traceparent := tracing.header(record_headers(message))):
            assert traceparent is not None
            batch.traces.append((traceparent, partition, offset))
        try:
            if batch.native is not None and self._native is not None:
                self._native.accept(batch.native, message.value() or b"", partition, offset)
                batch.mark(partition, offset)
            else:
                position = Position(self.topic, partition, offset)
                batch.add(event_row(self._codec.decode(message.value() or b""), position), position)
        except KeelError as exc:
            self._undecodable(Position(self.topic, partition, offset), exc)
        return False

    def _undecodable(self, position: Position, exc: KeelError) -> None:
        with self._stats_lock:  # the insert lane counts too
            self._stats = _bump(self._stats, undecodable=1)
        self._bad.inc()
        log.error(
            "undecodable event at %s[%d]@%d skipped: %s", position.topic, position.partition,
            position.offset, exc,
            extra={"topic": position.topic, "partition": position.partition,
                   "offset": position.offset, "code": exc.code, "reason": exc.message},
        )

    def _batch(self) -> Batch:
        return Batch(self.topic, native=NativeBatch() if self._native is not None else None)

    def _insert(self, batch: Batch) -> int:
        """The native path when available; the Python path when the engine refuses the batch.

        Either way values sealed under keys erased by now are written as ``⟨erased⟩``.
        """
        if batch.native is None or self._native is None:
            batch.redact(self._erasures.among(batch.payloads()))
            insert_batch(self._client, batch, self.table)
            return len(batch)
        erased = self._erasures.among(batch.native.records())
        try:
            self._native.insert(self._client, self.table, self.topic, batch.native, batch.token, erased)
            return len(batch)
        except ClickHouseError as exc:
            log.warning("native insert of %s refused (%s); decoding it in Python", batch.token, exc,
                        extra={"topic": self.topic, "token": batch.token})
        rows = Batch(self.topic)
        for value, partition, offset in self._native.decoded(batch.native):
            position = Position(self.topic, partition, offset)
            try:
                rows.add(event_row(self._codec.decode(value), position), position)
            except KeelError as exc:
                self._undecodable(position, exc)
        rows.same_records_as(batch)
        rows.redact(erased)
        insert_batch(self._client, rows, self.table)
        return len(rows)

    def _stored(self, batch: Batch, written: int) -> None:
        """After ``batch`` is stored, on the consuming thread (the consumer is not shared)."""
        # Informational only: ClickHouse holds the positions the projector resumes from.
        self._consumer.commit(offsets=[TopicPartition(self.topic, s.partition, s.last + 1)
                                       for s in batch.ordered_spans], asynchronous=True)
        with self._stats_lock:
            self._stats = _bump(self._stats, rows=written, batches=1)
        self._rows.inc(written)
        if batch.traces:
            projected(batch.traces, self.topic, self.table, batch.token, batch.opened_at)
        if batch.opened_at:
            self._metrics.batch(len(batch), time.time() - batch.opened_at)
        if batch.newest_ms > 0:
            self._lag.set(max(0.0, time.time() - batch.newest_ms / 1000))
        log.info("projected %d %s (%s)", written, self.table, batch.token,
                 extra={"topic": self.topic, "rows": written, "token": batch.token})
        if self._on_batch is not None:
            self._on_batch(self._stats)


class _InsertLane:
    """Inserts one batch at a time, in order, off the consuming thread.

    The next batch is read and encoded while the previous one is written, yet a batch is
    only inserted after the one before it is stored: the positions in ClickHouse never
    run ahead of a gap, so resuming from them stays exact.
    """

    def __init__(self, insert: Callable[[Batch], int], stored: Callable[[Batch, int], None]) -> None:
        self._insert = insert
        self._stored = stored
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="projector-insert")
        self._pending: tuple[Batch, Future[int]] | None = None
        self._written = 0

    @property
    def idle(self) -> bool:
        """Whether no insert is in flight."""
        return self._pending is None

    def submit(self, batch: Batch) -> None:
        """Insert ``batch`` once the previous insert is stored (its failure raises here)."""
        self.wait()
        if len(batch):
            self._pending = (batch, self._pool.submit(self._insert, batch))

    def poll(self) -> None:
        """Report the insert in flight if it is done, without waiting."""
        if self._pending is not None and self._pending[1].done():
            self.wait()

    def wait(self) -> int:
        """Wait for the insert in flight, then report it on this thread; returns the rows written."""
        if self._pending is not None:
            (batch, pending), self._pending = self._pending, None
            written = pending.result()
            self._written += written
            self._stored(batch, written)
        return self._written

    def close(self) -> None:
        """Let an insert in flight finish (its outcome is already moot when closing on an error)."""
        self._pool.shutdown(wait=True)


def _bump(stats: ProjectorStats, *, rows: int = 0, batches: int = 0, undecodable: int = 0) -> ProjectorStats:
    return ProjectorStats(stats.rows + rows, stats.batches + batches, stats.undecodable + undecodable)
