"""The command processor: a consume-transform-produce loop on Kafka transactions.

Each batch of commands commits its outcome in one Kafka transaction: the events, the dead
letters and the consumed offsets commit together, or not at all. A crash anywhere
leaves the batch uncommitted, invisible to ``read_committed`` consumers, and it is
decided again by whichever worker owns the partition next. One ``transactional.id`` per
worker instance plus the consumer group metadata sent with the offsets fence zombies.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from keel.bootstrap import edge_codec
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.errors import InfraError
from keel.kafka import transactions
from keel.kafka.clients import admin_config, consumer_config, loader_config, transactional_producer_config
from keel.kafka.errors import topic_partitions
from keel.kafka.idle import IdleCheck
from keel.kafka.reader import record_headers
from keel.kafka.topics import Topic, topic_name
from keel.domain.governance.controls import Controls
from keel.domain.governance.ratelimit import RateLimiter
from keel.domain.governance.pipeline import Decision
from keel.domain.events import ApprovalRequested, CommandRejected
from keel.domains.registry import current
from keel.logs import command_fields
from keel.observability import tracing
from keel.observability.batches import DecisionTally, LoopMetrics
from keel.observability.lag import lag_config
from keel.observability.metrics import partitions_changed
from keel.processor.controls import ControlsFollower
from keel.processor.handler import DeadLetter, Decided, Duplicate, Governance, handle
from keel.processor.snapshot_format import SnapshotFormat
from keel.processor.snapshots import Checkpoints
from keel.processor.spans import BatchSpans
from keel.processor.state import BatchView, PartitionState
from keel.sdk.producer import PRINCIPAL_TENANT_HEADER
from keel.supervision import collector
from keel.supervision.progress import IDLE, Progress
from keel.trust.entries import bundles

log = logging.getLogger(__name__)

_Headers = list[tuple[str, str | bytes | None]]
TYPE_HEADER = "keel-type"
"""Names, on an event record, the event's type: readers filter without decoding."""
COMMAND_TYPE_HEADER = "keel-command-type"
"""Names, on an event record, the command the event is about (effect workers check its kill switch)."""
EFFECT_HEADER = "keel-effect"
"""Names, on an event record that has an effect in the processor's registry, the effect's provider:
an effect worker without a handler for it reports the effect as waiting, never skips it."""
# topic, value, key, partition, headers: the arguments of one ``produce`` call.
_Record = tuple[str, bytes | None, bytes | None, int, _Headers | None]
# A decision not yet encoded: the decision, its command's key and partition, its events' trace headers.
_Decided = tuple[Decision, bytes | None, int, dict[uuid.UUID, bytes] | None]
_ANY_PARTITION = -1  # librdkafka's "unassigned": the partitioner picks by key
# Events decided before they go to the producer (about fifty ms of deciding). Each chunk costs a
# produce request per partition it writes: a batch the linger gathers at 5,000 commands/s fits in one.
_PRODUCE_CHUNK = 1000
_BUSY_RATE = 2_000.0  # commands a second (smoothed over about a second) above which batches linger (_poll)
_RATE_WINDOW_S = 1.0


@dataclass
class ProcessorStats:
    """Counters since start, for logs, the CLI and benchmarks."""

    batches: int = 0
    commands: int = 0
    events: int = 0
    rejected: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    aborted_batches: int = 0


class CommandProcessor:
    """One worker of the processor consumer group."""

    def __init__(self, settings: Settings, *, instance_id: str | None = None,
                 codec: EnvelopeCodec | None = None, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress = progress or Progress()
        if codec is None:
            codec, self._release_codec = edge_codec(settings)
        else:
            self._release_codec = lambda: None
        self.codec = codec
        self.stats = ProcessorStats()
        self.commands_topic = topic_name(settings, Topic.COMMANDS)
        self.events_topic = topic_name(settings, Topic.EVENTS)
        self.dlq_topic = topic_name(settings, Topic.DLQ)
        self.outputs = Outputs.of(settings)
        self.governance = Governance(Controls(), RateLimiter())
        self.group_id = f"{settings.topic_prefix}.processor"
        self.instance = instance = instance_id or settings.processor_instance
        self.partitions: dict[int, PartitionState] = {}
        self.metrics = LoopMetrics("processor")
        self._tracing = tracing.enabled()  # read once: the loop tests a bool, never the SDK
        self._rate = 0.0  # commands a second, smoothed over about _RATE_WINDOW_S
        self._batch_began = time.monotonic()  # when the last batch was taken
        membership: dict[str, object] = {"session.timeout.ms": settings.processor_session_timeout_ms,
                                         **lag_config(settings, self.group_id)}
        if settings.processor_static_membership:
            membership["group.instance.id"] = f"{self.group_id}.{instance}"
        self._consumer = Consumer(consumer_config(settings, self.group_id, **membership))
        self._checkpoints = Checkpoints(
            SnapshotFormat(current(), codec), topic_name(settings, Topic.SNAPSHOTS), self.events_topic,
            every_events=settings.processor_snapshot_events, interval_s=settings.processor_snapshot_interval_s)
        self._producer = Producer(transactional_producer_config(settings, f"{settings.topic_prefix}.processor.{instance}"))
        self._controls = ControlsFollower(settings, self.governance.controls)
        self._idle = IdleCheck(self._consumer, AdminClient(admin_config(settings)), self.group_id)
        try:
            self.progress.enter("checking topics")
            self._check_partitioning()
            self.progress.enter("reading controls")
            self._controls.start()
            self.progress.enter("init_transactions")
            self._producer.init_transactions(transactions.TIMEOUT_S)
        except BaseException:  # a broker away at start: leave nothing running behind
            self.close()
            raise
        self._consumer.subscribe([self.commands_topic], on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_lost)

    # -- partition ownership ------------------------------------------------------------

    def _check_partitioning(self) -> None:
        config = consumer_config(self.settings, self.group_id)
        checked = (self.commands_topic, self.events_topic, self.dlq_topic,
                   *((self._checkpoints.topic,) if self._checkpoints.enabled else ()))
        counts = {t: len(topic_partitions(self._consumer, config, t, 30)) for t in checked}
        if not all(counts.values()):
            raise InfraError(f"missing topics: {counts}; run `keel topics apply`", code="topics_missing")
        if len({counts[t] for t in checked if t != self.dlq_topic}) > 1:
            raise InfraError(
                f"{self.commands_topic}, {self.events_topic} and the snapshots must have equal partition counts: "
                f"{counts}",
                code="topic_partitions_mismatch",
            )

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.progress.enter("loading partitions")
        self.partitions.update(self._load_partitions([tp.partition for tp in partitions]))
        self.progress.partitions = len(self.partitions)
        self.progress.enter(IDLE)
        # The state just loaded (and all else made at start-up) lives as long as the worker
        # does: frozen out of the collections that would otherwise rescan all of it.
        collector.settle()
        partitions_changed("processor", self.instance, "assigned", len(partitions), len(self.partitions))
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition], change: str = "revoked") -> None:
        for tp in partitions:
            self.partitions.pop(tp.partition, None)
        self.progress.partitions = len(self.partitions)
        partitions_changed("processor", self.instance, change, len(partitions), len(self.partitions))
        log.info("%s partitions %s", change, sorted(tp.partition for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._on_revoke(consumer, partitions, "lost")

    def _load_partitions(self, partitions: list[int]) -> dict[int, PartitionState]:
        """Each partition's latest snapshot, then its committed events after it, all in one pass.

        A partition without a readable snapshot is folded from its first event.
        """
        if not partitions:
            return {}
        loader = Consumer(loader_config(self.settings, f"{self.group_id}.loader"))
        try:
            loaded = self._checkpoints.load(loader, partitions, self.settings.processor_dedupe_window_s,
                                            time.time(), lambda: self.progress.enter("loading snapshots"))
            states = {p: state for p, (state, _) in loaded.items()}
            loader.assign([TopicPartition(self.events_topic, p, start) for p, (_, start) in loaded.items()])
            pending = set(partitions)
            while pending:
                self.progress.enter("loading partitions")  # a step per chunk: a stalled load is seen
                chunk = loader.consume(10_000, timeout=0.1)
                self.codec.prefetch(m.value() for m in chunk)
                for message in chunk:
                    error, partition = message.error(), message.partition()
                    assert partition is not None  # a record and an end of partition have a position
                    if error is None:
                        states[partition].apply([self.codec.decode(message.value() or b"")])
                    elif error.code() == KafkaError._PARTITION_EOF:
                        self._checkpoints.folded(partition, states[partition], message.offset() or 0)
                        pending.discard(partition)
                    else:
                        raise KafkaException(error)
                now = time.time()
                for state in states.values():  # ids past the window never pile up while loading
                    state.decided.expire(now)
            return states
        finally:
            loader.close()

    # -- the loop -----------------------------------------------------------------------

    def process_batch(self, timeout_s: float = 0.1) -> int:
        """Decide one batch in one transaction; returns how many records it consumed.

        The batch is what arrived while the previous transaction committed (up to the batch
        size): under light load a command waits for one commit, not for a batch to fill;
        under heavy load batches grow and the cost of a transaction spreads over more
        commands. ``timeout_s`` bounds the wait for a first record.
        """
        messages = [m for m in self._poll(timeout_s) if not self._is_benign(m)]
        if not messages:
            self._idle.check(self.progress)
            return 0
        self.progress.enter("deciding")
        started = time.perf_counter()
        self._measure_rate(len(messages))
        view = BatchView(self.partitions)
        outcome_counts = ProcessorStats()
        tally = DecisionTally()
        produced = 0
        thrown: list[tuple[str, bytes | None]] = []
        chunk = Chunk()
        opened = False
        now = datetime.now(UTC)  # one decision time per batch: it commits as one transaction
        spans = BatchSpans(self.commands_topic, len(messages)) if self._tracing else None
        try:
            self.codec.prefetch(m.value() for m in messages)
            for message in messages:
                thrown += self._decide(message, view, outcome_counts, now, chunk, tally, spans)
                if len(chunk.decided) + len(chunk.records) >= _PRODUCE_CHUNK:  # large: send while deciding the rest
                    records = self._take(chunk)  # keys created before the transaction begins
                    if not opened:
                        self._open(messages)
                        opened = True
                    produced += self._produce(records)
            records = self._take(chunk)
            if not opened:
                self._open(messages)
            produced += self._produce(records)
            produced += self._checkpoints.add_to(self._producer, self.partitions, now.timestamp())
            committing = time.perf_counter()
            transactions.commit(self._producer, self.progress)
        except KafkaException as exc:
            if spans is not None:
                spans.end(str(exc))
            transactions.abort_and_rewind(self._producer, self._consumer, exc, "processor", self.progress)
            self.stats.aborted_batches += 1
            self.metrics.aborted.inc()
            return 0
        done = time.perf_counter()
        if spans is not None:
            spans.end()
        self.metrics.transaction(len(messages), produced, done - started, done - committing)
        tally.flush()
        self.progress.committed()
        self._checkpoints.committed(self.partitions)  # before the batch's changes join the state
        view.commit(now.timestamp())
        for key, value in thrown:  # this worker's own switches hold from its next batch on
            self.governance.controls.apply(key, value)
        self._add(outcome_counts, len(messages))
        return len(messages)

    def _open(self, messages: list[Message]) -> None:
        """Begin the batch's transaction and add the batch's offsets to it.

        Called once (some of) the batch is decided, not at once after the previous commit,
        and the offsets go first: a request that reaches the coordinator while it still
        writes the previous transaction's markers is refused (CONCURRENT_TRANSACTIONS) and
        retried after a backoff, ``retry.backoff.ms`` for AddOffsetsToTxn but a fixed 20 ms
        for the AddPartitionsToTxn a first ``produce`` triggers. Once the offsets are in,
        the transaction is under way and partitions register without a refusal.
        """
        self._producer.begin_transaction()
        transactions.send_offsets(self._producer, self._consumer, messages, self.progress)
        self.progress.enter("deciding")

    def _take(self, chunk: Chunk) -> list[_Record]:
        """The chunk's records, its decisions encoded first (``decided_records``), and the chunk emptied.

        Encoded together, not as each is decided: the keys their events' personal fields are sealed
        with are fetched, and a new subject's created, a few statements for the chunk, where sealing
        one event at a time made each new subject's key a durable write of its own (a quarter of
        the worker's time at 1,000 commands/s when the commands came unsealed).
        """
        decided, chunk.decided = chunk.decided, []
        self.codec.prepare(event for decision, _, _, _ in decided for event in decision.events)
        for decision, key, partition, traces in decided:
            decided_records(decision, self.codec, self.outputs, key, partition, chunk, traces)
        return chunk.take(self.outputs.audit_intake)

    def _produce(self, records: list[_Record]) -> int:
        """Hand the decided ``records`` to the open transaction; returns how many.

        Only the last events record of each partition asks for its delivery report: the
        checkpoints need how far each events partition got, and a partition's offsets only
        grow. Each report is a call into Python while the commit waits; one per record (events,
        audit intake, controls, snapshots) was two or more per command. A record that fails
        fails the transaction's commit, report or not.
        """
        last = {partition: index for index, (topic, _, _, partition, _) in enumerate(records)
                if topic == self.events_topic}
        reported = set(last.values())
        produce, delivered = self._producer.produce, self._checkpoints.delivered
        for index, (topic, value, key, partition, headers) in enumerate(records):
            if index in reported:
                produce(topic, value, key, partition=partition, headers=headers, on_delivery=delivered)
            else:
                produce(topic, value, key, partition=partition, headers=headers)
        return len(records)

    def _poll(self, timeout_s: float) -> list[Message]:
        """The records already fetched, or else the first to arrive within ``timeout_s`` and those behind it.

        Under load (more than ``_BUSY_RATE`` commands a second) the batch gathers until
        ``processor_linger_s`` after the last one was taken, or until it is full: each
        transaction costs the broker milliseconds of CPU whatever it holds (its markers, the
        coordinator's log, a produce request per partition), so fewer, larger ones leave more
        of the machine to the commands. Lighter load never waits.
        """
        size = self.settings.processor_batch_size
        messages = self._consumer.consume(size, 0)
        if not messages:
            messages = self._consumer.consume(1, timeout_s)
            if messages and size > 1:
                messages += self._consumer.consume(size - 1, 0)
        if messages and self._rate >= _BUSY_RATE and len(messages) < size:
            remaining = self._batch_began + self.settings.processor_linger_s - time.monotonic()
            if remaining > 0:
                messages += self._consumer.consume(size - len(messages), remaining)
        return messages

    def _measure_rate(self, taken: int) -> None:
        """Fold a batch of ``taken`` commands into the rate: what arrived since the last batch was taken.

        Smoothed so a burst at light load (two sends in one commit's time) does not make a batch linger.
        """
        now = time.monotonic()
        interval, self._batch_began = max(now - self._batch_began, 1e-3), now
        self._rate += min(1.0, interval / _RATE_WINDOW_S) * (taken / interval - self._rate)

    def _decide(self, message: Message, view: BatchView, counts: ProcessorStats, now: datetime,
                chunk: Chunk, tally: DecisionTally,
                spans: BatchSpans | None) -> list[tuple[str, bytes | None]]:
        """Decide one record and add its outcome to ``chunk``; returns the controls it threw."""
        partition = message.partition()
        assert partition is not None  # a record always has a position (process_batch took out the errors)
        headers, key = dict(record_headers(message)), message.key()  # each call copies out of librdkafka
        outcome = handle(message.value(), key, headers, partition, view, self.codec, self.governance, now)
        match outcome:
            case Decided(command, decision):
                events = decision.events
                verdict, rejection = decision_outcome(decision)
                traces = None if spans is None else spans.decided(
                    headers.get(tracing.HEADER), command, decision, verdict, rejection)
                chunk.decided.append((decision, key, partition, traces))
                counts.events += len(events)
                if verdict == "rejected":  # else none is: no walk of the events
                    counts.rejected += sum(type(e.payload) is CommandRejected for e in events)
                tally.decided(command.tenant_id, verdict, rejection, len(events))
                if log.isEnabledFor(logging.DEBUG):  # skip building the list when nobody logs it
                    log.debug("decided %s %s -> %s", command.type, command.id, [e.type for e in events],
                              extra=command_fields(command))
                return decision.controls
            case DeadLetter(code, reason):
                dead_headers: _Headers = [
                    *(message.headers() or []),
                    ("keel-error-code", code.encode()),
                    ("keel-error-reason", reason.encode()),
                    ("keel-source-topic", (message.topic() or "").encode()),
                    ("keel-source-partition", str(partition).encode()),
                    ("keel-source-offset", str(message.offset()).encode()),
                ]
                chunk.records.append((self.dlq_topic, message.value(), message.key(), _ANY_PARTITION, dead_headers))
                counts.dead_lettered += 1
                tally.dead_letter(code)
                if spans is not None:
                    spans.dead_letter(headers.get(tracing.HEADER), code, reason)
                tenant = headers.get(PRINCIPAL_TENANT_HEADER)  # the body may be unreadable: the producer's tenant
                log.warning("dead-lettered %s[%d]@%d: %s: %s", message.topic(), partition,
                            message.offset(), code, reason,
                            extra={"tenant_id": tenant.decode() if tenant else None, "code": code,
                                   "trace_id": tracing.trace_id_of(
                                       (headers.get(tracing.HEADER) or b"").decode() or None)})
            case Duplicate(command):
                counts.duplicates += 1
                tally.duplicate(command.tenant_id)
                if spans is not None:
                    spans.duplicate(headers.get(tracing.HEADER), command)
                log.info("duplicate command %s acknowledged, not re-executed", command.id,
                         extra=command_fields(command))
        return []

    @staticmethod
    def _is_benign(message: Message) -> bool:
        error = message.error()
        if error is None:
            return False
        if error.code() == KafkaError._PARTITION_EOF:
            return True
        raise KafkaException(error)

    def _add(self, counts: ProcessorStats, consumed: int) -> None:
        self.stats.batches += 1
        self.stats.commands += consumed - counts.dead_lettered
        self.stats.events += counts.events
        self.stats.rejected += counts.rejected
        self.stats.duplicates += counts.duplicates
        self.stats.dead_lettered += counts.dead_lettered

    # -- running ------------------------------------------------------------------------

    def run(self, stop: threading.Event, on_batch: Callable[[ProcessorStats], None] | None = None) -> None:
        """Decide batches until ``stop`` is set."""
        while not stop.is_set():
            if self.process_batch() and on_batch is not None:
                on_batch(self.stats)

    def run_until_caught_up(self, timeout_s: float = 60.0) -> ProcessorStats:
        """Decide every command that was on the topic when called; for demos, tests, tools."""
        deadline = time.monotonic() + timeout_s
        while not self._consumer.assignment():
            if time.monotonic() > deadline:
                raise InfraError("the processor got no partitions in time", code="no_assignment")
            self.process_batch(0.2)
        targets = transactions.end_offsets(self._consumer)
        while not transactions.caught_up(self._consumer, targets):
            if time.monotonic() > deadline:
                raise InfraError(f"the processor did not catch up within {timeout_s:.0f}s",
                                 code="catch_up_timeout")
            self.process_batch(0.2)
        return self.stats

    def close(self) -> None:
        """Leave the group and release the producer; an open transaction is aborted by the broker."""
        try:
            self._controls.close()
            self._consumer.close()
            transactions.release(self._producer)
        finally:
            self._release_codec()


@dataclass(frozen=True)
class Outputs:
    """The topics a decision's records go to."""

    events: str
    audit_intake: str
    controls: str

    @classmethod
    def of(cls, settings: Settings) -> Outputs:
        """The topics under ``settings``' prefix."""
        return cls(topic_name(settings, Topic.EVENTS), topic_name(settings, Topic.AUDIT_INTAKE),
                   topic_name(settings, Topic.CONTROLS))


@dataclass
class Chunk:
    """Decided records on their way to the producer: decisions until they are encoded together
    (``CommandProcessor._take``), events, controls and dead letters as they are, and each
    tenant's audit intake gathered, to go as bundles (``keel.trust.entries``).

    Why bundles: a produced record costs about 1.6 µs here, and the broker and the chainer
    their share, whatever its size; a tenant's events of a chunk go as one record or a few.
    """

    records: list[_Record] = field(default_factory=list)
    intake: dict[str, list[bytes]] = field(default_factory=dict)
    decided: list[_Decided] = field(default_factory=list)

    def take(self, audit_intake: str) -> list[_Record]:
        """Every record of the chunk, the intake bundled per tenant (in decision order), and the chunk emptied.

        Keyed by tenant alone: the audit chainer sees a tenant's events in one partition, in
        the order these transactions committed them. No headers: the chainer reads only the value.
        """
        records = self.records
        for tenant, values in self.intake.items():
            key = tenant.encode()
            records.extend((audit_intake, value, key, _ANY_PARTITION, None) for value in bundles(values))
        self.records, self.intake = [], {}
        return records


def decided_records(decision: Decision, codec: EnvelopeCodec, outputs: Outputs, key: bytes | None, partition: int,
                    chunk: Chunk, traces: dict[uuid.UUID, bytes] | None = None) -> None:
    """Add ``decision``'s records to ``chunk``: each event to the events topic (with its type headers)
    and to its tenant's audit intake, then its controls.

    ``traces`` (tracing on) maps a causing command's id to the ``traceparent`` header of its events.
    """
    records, intake = chunk.records, chunk.intake
    for event in decision.events:
        value = codec.encode(event)
        type_headers = _type_headers(event.type, decision.origin_type)
        if traces is not None and event.causation_id in traces:
            type_headers = [*type_headers, (tracing.HEADER, traces[event.causation_id])]
        records.append((outputs.events, value, key, partition, type_headers))
        tenant_intake = intake.get(event.tenant_id)
        if tenant_intake is None:
            tenant_intake = intake[event.tenant_id] = []
        tenant_intake.append(value)
    for control_key, control_value in decision.controls:
        records.append((outputs.controls, control_value, control_key.encode(), _ANY_PARTITION, None))


def decision_outcome(decision: Decision) -> tuple[str, str]:
    """``(outcome, rejection code)`` of a decision: accepted, rejected (with its code) or pending (a wait)."""
    outcome = "accepted"
    for event in decision.events:
        payload = event.payload
        # Identity tests: a class check that fails on a pydantic model goes through ABCMeta.
        if type(payload) is CommandRejected:
            return "rejected", payload.code
        if type(payload) is ApprovalRequested:
            outcome = "pending"
    return outcome, ""


@functools.cache
def _type_headers(event_type: str, command_type: str | None) -> _Headers:
    """The headers of an event record: its type and the type of the command it is about
    (built once per pair; the producer only reads them)."""
    headers: _Headers = [(TYPE_HEADER, event_type.encode())]
    if command_type:
        headers.append((COMMAND_TYPE_HEADER, command_type.encode()))
    effect = current().effect_of.get(event_type)
    if effect is not None:
        headers.append((EFFECT_HEADER, effect.provider.encode()))
    return headers


def new_instance_id() -> str:
    """A unique worker instance id, for ad-hoc workers."""
    return uuid.uuid4().hex[:12]
