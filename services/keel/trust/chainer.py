"""The chainer: appends every intake record to its tenant's hash chain, exactly once.

A consume-transform-produce loop on Kafka transactions, like the processor. It reads
``<prefix>.audit-intake`` partition p (key = tenant) and writes records to ``<prefix>.audit``
partition p, and due checkpoints to ``<prefix>.audit-checkpoints`` partition p; the records,
checkpoints and consumed offsets commit together or not at all. The per-tenant state
(last seq, head hash) is folded from the committed audit partition on assignment, after
waiting for any open transaction on it to finish, so a restarted or new owner continues
each chain exactly where the last committed transaction left it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from keel.config import Settings
from keel.contracts.catalog import load_catalog
from keel.errors import InfraError
from keel.kafka import transactions
from keel.kafka.clients import BATCHED_FETCH, admin_config, consumer_config, transactional_producer_config
from keel.kafka.idle import IdleCheck
from keel.kafka.topics import Topic, topic_name
from keel.observability.batches import LoopMetrics
from keel.observability.lag import lag_config
from keel.observability.metrics import (
    CHAIN_HEAD,
    CHAINED,
    CHECKPOINT_AGE,
    CHECKPOINTS,
    LAST_CHECKPOINT,
    UNSIGNED,
    Values,
    bounded,
    partitions_changed,
    tenant_label,
)
from keel.supervision.progress import IDLE, Progress
from keel.trust.checkpoints import CheckpointSigner
from keel.trust.entries import entries_from_intake
from keel.trust.record import GENESIS, peek, seal_record
from keel.trust.settings import CHAIN_LINGER_S

log = logging.getLogger(__name__)


class TenantHead(NamedTuple):
    """Where a tenant's chain stands, and what is not yet signed (a new one per record chained)."""

    seq: int = 0
    head: bytes = GENESIS
    signed_seq: int = 0
    unsigned_since: float = 0.0


@dataclass
class ChainerStats:
    """Counters since start."""

    batches: int = 0
    records: int = 0  # audit records appended (one intake bundle gives many)
    checkpoints: int = 0
    aborted_batches: int = 0
    heads: dict[str, int] = field(default_factory=dict)


class Chainer:
    """One instance of the chainer consumer group."""

    def __init__(self, settings: Settings, signer: CheckpointSigner, *, instance_id: str = "0",
                 checkpoint_every: int = 1000, checkpoint_interval_s: float = 10.0,
                 batch_size: int = 5000, linger_s: float = CHAIN_LINGER_S, progress: Progress | None = None) -> None:
        self.settings, self.signer, self.instance = settings, signer, instance_id
        self.linger_s = linger_s
        self.progress = progress or Progress()
        self.checkpoint_every, self.checkpoint_interval_s = checkpoint_every, checkpoint_interval_s
        self.batch_size = batch_size
        self.catalog = load_catalog()
        self.stats = ChainerStats()
        self.intake_topic = topic_name(settings, Topic.AUDIT_INTAKE)
        self.audit_topic = topic_name(settings, Topic.AUDIT)
        self.checkpoints_topic = topic_name(settings, Topic.AUDIT_CHECKPOINTS)
        self.group_id = f"{settings.topic_prefix}.chainer"
        self.partitions: dict[int, dict[str, TenantHead]] = {}
        # Static membership: a restarted instance takes its partitions back at once, without
        # waiting for the dead incarnation's session to time out.
        self._consumer = Consumer(consumer_config(
            settings, self.group_id, **{"group.instance.id": f"{settings.topic_prefix}.chainer.{instance_id}",
                                        "enable.partition.eof": True, **BATCHED_FETCH,
                                        **lag_config(settings, self.group_id)}))
        self.metrics = LoopMetrics("chainer")
        CHAIN_HEAD.source, UNSIGNED.source, CHECKPOINT_AGE.source = self._heads, self._unsigned, self._waiting
        self._ends: dict[int, int] = {}  # partition -> offset where the consumer last hit its end
        self._producer = Producer(transactional_producer_config(
            settings, f"{settings.topic_prefix}.chainer.{instance_id}"))
        # Its input is written in the processor's transactions: an open one holds records back.
        self._idle = IdleCheck(self._consumer, AdminClient(admin_config(settings)), self.group_id, records=False)
        try:
            self.progress.enter("checking topics")
            self._check_partitioning()
            self.progress.enter("init_transactions")
            self._producer.init_transactions(60)  # fences a previous incarnation, resolves its transaction
        except BaseException:  # a broker away at start: leave no client behind
            self._consumer.close()
            raise
        self._consumer.subscribe([self.intake_topic], on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_lost)

    # -- partition ownership ------------------------------------------------------------

    def _check_partitioning(self) -> None:
        """Intake p feeds audit p: the two topics must exist with equal partition counts."""
        metadata = self._consumer.list_topics(timeout=30).topics
        counts = {t: len(metadata[t].partitions) if t in metadata else 0
                  for t in (self.intake_topic, self.audit_topic, self.checkpoints_topic)}
        if not all(counts.values()) or len(set(counts.values())) != 1:
            raise InfraError(f"audit topics missing or with unequal partition counts: {counts}; "
                             "run `keel topics apply`", code="topic_partitions_mismatch")

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.progress.enter("loading partitions")
        self.partitions.update(self._fold([tp.partition for tp in partitions]))
        self.progress.partitions = len(self.partitions)
        self.progress.enter(IDLE)
        partitions_changed("chainer", self.instance, "assigned", len(partitions), len(self.partitions))
        log.info("chainer assigned partitions %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition], change: str = "revoked") -> None:
        for tp in partitions:
            self.partitions.pop(tp.partition, None)
            self._ends.pop(tp.partition, None)
        self.progress.partitions = len(self.partitions)
        partitions_changed("chainer", self.instance, change, len(partitions), len(self.partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._on_revoke(consumer, partitions, "lost")

    def _fold(self, partitions: list[int], timeout_s: float = 120.0) -> dict[int, dict[str, TenantHead]]:
        """Every tenant's head in the committed audit ``partitions``, once no transaction is open on them."""
        heads: dict[int, dict[str, TenantHead]] = {p: {} for p in partitions}
        if not partitions:
            return heads
        loader = Consumer(consumer_config(self.settings, f"{self.group_id}.loader",
                                          **{"enable.partition.eof": True}))
        deadline = time.monotonic() + timeout_s
        try:
            loader.assign([TopicPartition(self.audit_topic, p, OFFSET_BEGINNING) for p in partitions])
            pending, eof_at = set(partitions), {p: -1 for p in partitions}
            while pending:
                self.progress.enter("loading partitions")  # a step per chunk; the deadline bounds the whole
                for message in loader.consume(10_000, timeout=0.2):
                    error = message.error()
                    if error is None:
                        seq, _prev, tenant, digest = peek(message.value() or b"")
                        if message.key() != tenant.encode():
                            # written by someone else than a chainer: never let it move a head
                            log.warning("ignoring audit record keyed %r that claims tenant %r",
                                        message.key(), tenant)
                            continue
                        heads[_partition(message)][tenant] = TenantHead(seq, digest)
                    elif error.code() == KafkaError._PARTITION_EOF:
                        eof_at[_partition(message)] = _offset(message)
                    else:
                        raise KafkaException(error)
                for partition in list(pending):
                    # read_committed stops at the last stable offset: it reaches the high
                    # watermark only once no transaction is still open on the partition.
                    tp = TopicPartition(self.audit_topic, partition)
                    position = max(eof_at[partition], loader.position([tp])[0].offset)
                    if position >= loader.get_watermark_offsets(tp, timeout=10, cached=False)[1]:
                        pending.discard(partition)
                if time.monotonic() > deadline:
                    raise InfraError(f"audit partitions {sorted(pending)} kept an open transaction for "
                                     f"{timeout_s:.0f}s", code="chainer_fold_timeout")
            return heads
        finally:
            loader.close()

    # -- the loop -----------------------------------------------------------------------

    def process_batch(self, timeout_s: float = 0.05) -> int:
        """Chain one batch in one transaction; returns how many intake records it consumed."""
        messages = [m for m in self._consumer.consume(self.batch_size, timeout_s) if not self._is_end(m)]
        now = time.monotonic()
        due_by_time = [(p, t) for p, heads in self.partitions.items() for t, h in heads.items()
                       if h.seq > h.signed_seq and now - h.unsigned_since >= self.checkpoint_interval_s]
        if not messages and not due_by_time:
            self._idle.check(self.progress)
            return 0
        touched: dict[tuple[int, str], TenantHead] = {}
        started, signed_before = time.perf_counter(), self.stats.checkpoints
        self.progress.enter("chaining")
        self._producer.begin_transaction()
        chained = 0
        try:
            for message in messages:
                chained += self._append(message, touched, now)
            self._checkpoint(touched, due_by_time, now)
            if messages:
                transactions.send_offsets(self._producer, self._consumer, messages, self.progress)
            committing = time.perf_counter()
            transactions.commit(self._producer, self.progress)
        except KafkaException as exc:
            transactions.abort_and_rewind(self._producer, self._consumer, exc, "chainer", self.progress)
            self.stats.aborted_batches += 1
            self.metrics.aborted.inc()
            return 0
        self.progress.committed()
        self._count(len(messages), chained, self.stats.checkpoints - signed_before, started, committing)
        for (partition, tenant), head in touched.items():
            if partition in self.partitions:
                tenant_label(tenant, head.seq - self.partitions[partition].get(tenant, TenantHead()).seq)
                self.partitions[partition][tenant] = head
                self.stats.heads[tenant] = head.seq
        self.stats.batches += 1
        self.stats.records += chained
        return len(messages)

    def _append(self, message: Message, touched: dict[tuple[int, str], TenantHead], now: float) -> int:
        """Chain the entries of one intake record (a bundle holds many) in their order; returns how many."""
        partition = _partition(message)
        key_tenant = (message.key() or b"").decode(errors="replace")
        entries = entries_from_intake(message.value() or b"", key_tenant, self.catalog)
        for entry in entries:
            slot = (partition, entry.tenant)
            current = touched.get(slot) or self.partitions[partition].get(entry.tenant) or TenantHead()
            raw = seal_record(current.seq + 1, current.head, entry)
            self._producer.produce(self.audit_topic, raw, entry.tenant.encode(), partition=partition)
            unsigned_since = current.unsigned_since if current.seq > current.signed_seq else now
            touched[slot] = TenantHead(current.seq + 1, raw[-32:], current.signed_seq, unsigned_since)
            if current.seq + 1 - current.signed_seq >= self.checkpoint_every:
                self._sign(touched, slot, now)
        return len(entries)

    def _checkpoint(self, touched: dict[tuple[int, str], TenantHead], due_by_time: list[tuple[int, str]],
                    now: float) -> None:
        for slot in due_by_time:
            head = touched.get(slot) or self.partitions[slot[0]][slot[1]]
            if head.seq > head.signed_seq:  # this batch may have signed it already
                self._sign(touched, slot, now)

    def _sign(self, touched: dict[tuple[int, str], TenantHead], slot: tuple[int, str], now: float) -> None:
        partition, tenant = slot
        head = touched.get(slot) or self.partitions[partition][tenant]
        checkpoint = self.signer.sign(tenant, head.seq, head.head)
        self._producer.produce(self.checkpoints_topic, checkpoint.to_json().encode(), tenant.encode(),
                               partition=partition)
        touched[slot] = TenantHead(head.seq, head.head, head.seq, now)
        self.stats.checkpoints += 1

    # -- metrics ------------------------------------------------------------------------

    def _count(self, consumed: int, chained: int, signed: int, started: float, committing: float) -> None:
        """One committed batch: the intake records it consumed, the audit records and checkpoints it wrote."""
        done = time.perf_counter()
        self.metrics.transaction(consumed, chained + signed, done - started, done - committing)
        CHAINED.inc(chained)
        if signed:
            CHECKPOINTS.inc(signed)
            LAST_CHECKPOINT.set(time.time())

    def _tenants(self) -> list[tuple[str, TenantHead]]:
        """Every owned tenant's head (read from the scrape thread: copies, each made in one step)."""
        return [item for heads in list(self.partitions.values()) for item in list(heads.items())]

    def _heads(self) -> Values:
        return bounded(((tenant, head.seq) for tenant, head in self._tenants()), max)

    def _unsigned(self) -> Values:
        return bounded(((tenant, head.seq - head.signed_seq) for tenant, head in self._tenants()),
                       lambda a, b: a + b)

    def _waiting(self) -> Values:
        now = time.monotonic()
        return bounded(((tenant, now - head.unsigned_since if head.seq > head.signed_seq else 0.0)
                        for tenant, head in self._tenants()), max)

    # -- running ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Chain batches until ``stop`` is set, each gathered for ``linger_s`` (or until full)."""
        while not stop.is_set():
            self.process_batch(self.linger_s)

    def run_until_caught_up(self, timeout_s: float = 60.0) -> ChainerStats:
        """Chain everything on the intake topic when called, then sign every unsigned head."""
        deadline = time.monotonic() + timeout_s
        while not self._consumer.assignment():
            if time.monotonic() > deadline:
                raise InfraError("the chainer got no partitions in time", code="no_assignment")
            self.process_batch(0.2)
        targets = {tp.partition: self._consumer.get_watermark_offsets(tp, timeout=10)[1]
                   for tp in self._consumer.assignment()}
        while True:
            # The position and end offsets pass transaction markers; committed offsets never reach them.
            done = {tp.partition: max(tp.offset, self._ends.get(tp.partition, -1))
                    for tp in self._consumer.position(self._consumer.assignment())}
            if all(high == 0 or done.get(p, -1) >= high for p, high in targets.items()):
                break
            if time.monotonic() > deadline:
                raise InfraError(f"the chainer did not catch up within {timeout_s:.0f}s: at {done}, "
                                 f"targets {targets}, {self.stats}", code="catch_up_timeout")
            self.process_batch(0.2)
        self.checkpoint_interval_s, interval = 0.0, self.checkpoint_interval_s
        try:
            self.process_batch(0.0)  # sign every head still unsigned
        finally:
            self.checkpoint_interval_s = interval
        return self.stats

    def _is_end(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return False
        if error.code() == KafkaError._PARTITION_EOF:
            self._ends[_partition(message)] = _offset(message)
            return True
        raise KafkaException(error)

    def close(self) -> None:
        """Leave the group and release the producer; an open transaction is aborted by the broker."""
        self._consumer.close()
        transactions.release(self._producer)


def _partition(message: Message) -> int:
    partition = message.partition()
    assert partition is not None, "a consumed message always has a partition"
    return partition


def _offset(message: Message) -> int:
    offset = message.offset()
    assert offset is not None, "a consumed message always has an offset"
    return offset
