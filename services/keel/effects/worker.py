"""The effect worker: carries recorded events into the outside world (``keel effects run``).

Workers form the consumer group ``<prefix>.effects`` on the events topic (``read_committed``,
so only decided events count) and commit offsets by hand: per partition only up to the
lowest effect whose outcome command Kafka has not acknowledged (``keel.effects.offsets``).
A worker killed at any point therefore runs again exactly the effects without a recorded
outcome, under the same idempotency keys; one that finished an effect twice sends the same
outcome command id twice, and the processor keeps the first.

One asyncio loop per worker polls the consumer and the producer without blocking, sorts
records by their headers (``keel.effects.intake``) and queues effects per aggregate
(``keel.effects.scheduler``); ``keel.effects.runner`` runs each to its outcome. When more
than ``KEEL_EFFECTS_MAX_BUFFERED`` effects are queued, the worker stops reading until half
are done. On a partition's revocation it commits what is safe and drops the partition's
queued effects (attempts under way finish; their outcome ids are deterministic). On stop it
starts nothing new, waits up to ``KEEL_EFFECTS_STOP_GRACE_S`` for attempts under way and
their outcomes, commits and leaves the group.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.domain.events import EffectCancelled, EffectFailed, EffectRetried, EffectSucceeded
from keel.domain.governance.controls import Controls
from keel.domains import http
from keel.domains.registry import current
from keel.effects import gauges
from keel.effects.breakers import Breakers
from keel.effects.intake import EnvelopeShell, Headers, Interest, header_text, interest, undone_command
from keel.effects.jobs import UNKNOWN_PROVIDER, Job, Located, Trigger
from keel.effects.locate import EventLocator
from keel.effects.offsets import PartitionOffsets
from keel.effects.opening import personal_opener
from keel.effects.runner import EffectRunner, EffectStats
from keel.effects.scheduler import Lanes, Limits
from keel.effects.sending import Sender
from keel.errors import InfraError, KeelError
from keel.kafka.clients import consumer_config
from keel.kafka.reader import record_headers
from keel.kafka.topics import Topic, topic_name
from keel.observability import tracing
from keel.observability.lag import lag_config
from keel.observability.metrics import partitions_changed
from keel.processor.controls import ControlsFollower
from keel.processor.worker import COMMAND_TYPE_HEADER, EFFECT_HEADER, TYPE_HEADER, new_instance_id
from keel.supervision.progress import Progress

log = logging.getLogger(__name__)

__all__ = ["EffectStats", "EffectWorker", "run_worker"]

POLLING = "polling"
"""The loop's step: entered on every turn, so a loop that stops turning is a stall the watchdog sees."""
BATCH = 1000
IDLE_S = 0.005
COMMIT_EVERY_S = 1.0
SESSION_TIMEOUT_MS = 10_000  # a killed worker's partitions move after 10 s, not the default 45


class EffectWorker:
    """One member of the effect worker group."""

    def __init__(self, settings: Settings, *, instance_id: str | None = None, progress: Progress | None = None,
                 stats: EffectStats | None = None) -> None:
        self.settings = settings
        self.instance = instance_id or new_instance_id()
        self.progress = progress or Progress()
        self.stats = stats or EffectStats()
        self.registry = current()
        self.codec = EnvelopeCodec()  # personal fields stay sealed until an attempt opens them
        self.topic = topic_name(settings, Topic.EVENTS)
        self.group_id = f"{settings.topic_prefix}.effects"
        self.controls = Controls()
        self._shell = EnvelopeShell(self.codec)
        self._partitions: dict[int, PartitionOffsets] = {}
        self._committed: dict[int, int] = {}
        self._jobs: dict[uuid.UUID, Job] = {}
        self._by_origin: dict[uuid.UUID, list[Job]] = {}
        self._paused = False
        self._assigned = False
        membership: dict[str, object] = {"session.timeout.ms": SESSION_TIMEOUT_MS, "on_commit": self._on_commit,
                                         **lag_config(settings, self.group_id)}
        if settings.effects_static_membership:
            membership["group.instance.id"] = f"{self.group_id}.{self.instance}"
        self._consumer = Consumer(consumer_config(settings, self.group_id, **membership))
        self._sender = Sender(settings, self.codec)
        self._follower = ControlsFollower(settings, self.controls)
        self._locator = EventLocator(settings, self.codec)
        self._opener, self._release_keys = personal_opener(settings)
        self._pool = ThreadPoolExecutor(settings.effects_threads, thread_name_prefix="effect-handler")
        self._locating = ThreadPoolExecutor(1, thread_name_prefix="effect-locator")  # one thread: one consumer
        breakers = Breakers(settings.effects_breaker_failures, settings.effects_breaker_cooldown_s,
                            settings.effects_breaker_max_cooldown_s)
        gauges.watch(self.instance, lambda: len(self._jobs), breakers)
        self._runner = EffectRunner(
            worker=self.instance, registry=self.registry, controls=self.controls,
            breakers=breakers,
            limits=Limits(total=settings.effects_max_in_flight, per_tenant=settings.effects_max_per_tenant,
                          per_provider=settings.effects_max_per_provider),
            sender=self._sender, opener=self._opener, pool=self._pool, locate=self._locate,
            stats=self.stats)
        self._lanes: Lanes[Job] = Lanes(self._run_job)
        try:
            self.progress.enter("reading controls")
            self._follower.start()
        except BaseException:  # a broker away at start: leave nothing running behind
            self.close()
            raise

    # -- running ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Run effects until ``stop`` is set, then stop as the module docstring says."""
        asyncio.run(self._run(stop))

    async def _run(self, stop: threading.Event) -> None:
        self._consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        commit_at = time.monotonic() + COMMIT_EVERY_S
        try:
            while not stop.is_set():
                self.progress.enter(POLLING)
                self._sender.poll()
                messages = self._consumer.consume(BATCH, 0)
                for message in messages:
                    self._take(message)
                self._flow_control()
                if self._lanes.error is not None:
                    raise InfraError(f"an effect lane failed: {self._lanes.error!r}",
                                     code="effect_lane_failed") from self._lanes.error
                if time.monotonic() >= commit_at:
                    self._commit(asynchronous=True)
                    commit_at = time.monotonic() + COMMIT_EVERY_S
                await asyncio.sleep(0 if messages else IDLE_S)
            await self._drain()
        finally:
            await self._lanes.close()
            await http.close()  # the handlers' pooled connections belong to this loop

    async def _drain(self) -> None:
        """Start nothing new; let attempts under way and their outcomes finish (within the grace); commit."""
        self.progress.enter("stopping")
        self._runner.stopping = True
        for job in self._jobs.values():
            job.wake.set()
        deadline = time.monotonic() + self.settings.effects_stop_grace_s
        while self._runner.busy and time.monotonic() < deadline:
            self._sender.poll()
            await asyncio.sleep(IDLE_S)
        if self._runner.busy:
            log.warning("%d effects were still running when the worker stopped; they run again after a restart",
                        self._runner.busy)
        self._commit(asynchronous=False)

    async def _run_job(self, job: Job) -> None:
        try:
            await self._runner.run(job)
        finally:
            if job.settled:
                job.offsets.release(job.offset)
            if self._jobs.get(job.effect_id) is job:
                del self._jobs[job.effect_id]
            same = self._by_origin.get(job.origin_command_id, [])
            if job in same:
                same.remove(job)
                if not same:
                    del self._by_origin[job.origin_command_id]

    async def _locate(self, where: Located, effect_id: uuid.UUID) -> Trigger | None:
        return await asyncio.get_running_loop().run_in_executor(self._locating, self._locator.read, where, effect_id)

    # -- records ------------------------------------------------------------------------

    def _take(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            raise KafkaException(error)
        partition, offset = message.partition(), message.offset()
        assert partition is not None and offset is not None  # a record always has a position
        offsets = self._partitions.get(partition)
        if offsets is None:  # fetched just before its partition was revoked
            return
        offsets.read(offset)
        headers = dict(record_headers(message))
        wanted = interest(headers, self.registry)
        if wanted is Interest.NONE:
            return
        value = message.value() or b""
        local = header_text(headers, TYPE_HEADER) in self.registry.effect_of
        if wanted & (Interest.COMPENSATION | Interest.OUTCOME | Interest.RETRY) or local:
            try:
                event = self.codec.decode(value)
            except KeelError as exc:
                log.error("cannot decode %s[%d]@%d: %s; skipping it", self.topic, partition, offset, exc)
                return
            if wanted & Interest.COMPENSATION:
                self._undo(event)
            if wanted & Interest.OUTCOME:
                self._recorded(event)
            if wanted & Interest.RETRY:
                self._retry(event, offsets, partition, offset)
            if local:
                effect = self.registry.effect_of[event.type]
                self._add(Job(
                    offsets=offsets, partition=partition, offset=offset, tenant_id=event.tenant_id,
                    aggregate_id=event.aggregate_id, effect_id=event.id,
                    origin_command_id=event.causation_id or event.id, correlation_id=event.correlation_id,
                    generation=0, event_type=event.type, provider=effect.provider, effect=effect,
                    trigger=Trigger(event, header_text(headers, COMMAND_TYPE_HEADER),
                                    header_text(headers, EFFECT_HEADER), header_text(headers, tracing.HEADER))))
                return
        if wanted & Interest.TRIGGER:
            self._hold_without_handler(value, headers, offsets, partition, offset)

    def _hold_without_handler(self, value: bytes, headers: Headers, offsets: PartitionOffsets, partition: int,
                              offset: int) -> None:
        """Queue an effect this worker has no handler for: it waits, and holds its partition's commit point."""
        try:
            shell = self._shell.read(value)
        except KeelError as exc:
            log.error("cannot read the envelope of %s[%d]@%d: %s; skipping it", self.topic, partition, offset, exc)
            return
        effect_id: uuid.UUID = shell["id"]
        self._add(Job(
            offsets=offsets, partition=partition, offset=offset, tenant_id=shell["tenant_id"],
            aggregate_id=shell["aggregate_id"], effect_id=effect_id,
            origin_command_id=shell["causation_id"] or effect_id, correlation_id=shell["correlation_id"],
            generation=0, event_type=shell["type"],
            provider=header_text(headers, EFFECT_HEADER) or UNKNOWN_PROVIDER, effect=None))

    def _add(self, job: Job) -> None:
        self._jobs[job.effect_id] = job
        self._by_origin.setdefault(job.origin_command_id, []).append(job)
        job.offsets.hold(job.offset)
        self._lanes.add(job.key, job)

    def _recorded(self, event: Envelope) -> None:
        """An outcome is recorded: let go of the effect if it still waits here."""
        outcome = event.payload
        assert isinstance(outcome, EffectSucceeded | EffectFailed | EffectCancelled)
        self._let_go(outcome.effect_id, outcome.generation)

    def _retry(self, event: Envelope, offsets: PartitionOffsets, partition: int, offset: int) -> None:
        retried = event.payload
        assert isinstance(retried, EffectRetried)
        self._let_go(retried.effect_id, retried.generation - 1)  # a retry follows an outcome
        self._add(Job(
            offsets=offsets, partition=partition, offset=offset, tenant_id=event.tenant_id,
            aggregate_id=event.aggregate_id, effect_id=retried.effect_id, origin_command_id=retried.origin_command_id,
            correlation_id=event.correlation_id, generation=retried.generation, event_type="",
            provider=UNKNOWN_PROVIDER, effect=None, located=Located(retried.event_partition, retried.event_offset)))

    def _let_go(self, effect_id: uuid.UUID, generation: int) -> None:
        """The outcome of ``generation`` is recorded: a job of it (or older) that is not in an attempt is settled."""
        job = self._jobs.get(effect_id)
        if job is not None and job.generation <= generation and not job.attempting:
            job.settled = True
            job.interrupt()

    def _undo(self, event: Envelope) -> None:
        """A compensating event: the effects of the command it undoes must not start any more."""
        undone = undone_command(event, self.registry.undone_field[event.type])
        for job in self._by_origin.get(undone, []) if undone is not None else []:
            if not job.settled:
                job.interrupt(undone=True)

    # -- offsets and partitions ---------------------------------------------------------

    def _flow_control(self) -> None:
        """Stop reading while too many effects are queued; read on once half of them are done."""
        queued, bound = self._lanes.queued, self.settings.effects_max_buffered
        if self._assigned and self._paused:  # partitions assigned while paused are paused too
            self._consumer.pause(self._consumer.assignment())
        self._assigned = False
        if not self._paused and queued >= bound:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True
            log.info("%d effects queued: reading paused", queued)
        elif self._paused and queued <= bound // 2:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False
            log.info("%d effects queued: reading resumed", queued)

    def _commit(self, partitions: list[int] | None = None, *, asynchronous: bool) -> None:
        """Commit each partition's commit point that Kafka does not have yet."""
        chosen = self._partitions if partitions is None else {
            p: self._partitions[p] for p in partitions if p in self._partitions}
        offsets = [TopicPartition(self.topic, p, point) for p, tracked in chosen.items()
                   if (point := tracked.commit_point()) is not None and point != self._committed.get(p)]
        if not offsets:
            return
        try:
            if asynchronous:
                self._consumer.commit(offsets=offsets, asynchronous=True)
            else:
                self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # the next commit carries the same points
            log.warning("committing effect offsets failed: %s", exc)
            return
        self.progress.committed()

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None:
            log.warning("committing effect offsets failed: %s", error)
            return
        for tp in partitions:
            if tp.error is None and tp.topic == self.topic:
                self._committed[tp.partition] = tp.offset

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions[tp.partition] = PartitionOffsets()
            self._committed.pop(tp.partition, None)
        self._assigned = True
        self.progress.partitions = len(self._partitions)
        partitions_changed("effects", self.instance, "assigned", len(partitions), len(self._partitions))
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions), extra={"worker": self.instance})

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._commit([tp.partition for tp in partitions], asynchronous=False)
        self._release_partitions(partitions)
        partitions_changed("effects", self.instance, "revoked", len(partitions), len(self._partitions))
        log.info("revoked partitions %s", sorted(tp.partition for tp in partitions), extra={"worker": self.instance})

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release_partitions(partitions)
        partitions_changed("effects", self.instance, "lost", len(partitions), len(self._partitions))
        log.warning("lost partitions %s", sorted(tp.partition for tp in partitions), extra={"worker": self.instance})

    def _release_partitions(self, partitions: list[TopicPartition]) -> None:
        """Forget the partitions and drop their queued effects (an attempt under way finishes)."""
        gone = {tp.partition for tp in partitions}
        for partition in gone:
            self._partitions.pop(partition, None)
        for job in self._jobs.values():
            if job.partition in gone:
                job.interrupt()
        self.progress.partitions = len(self._partitions)

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the group and release every client."""
        gauges.forget(self.instance)
        try:
            self._follower.close()
            self._consumer.close()
            self._locator.close()
            if self._sender.flush(5.0):
                log.warning("some effect reports were still unsent when the worker closed")
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._locating.shutdown(wait=False, cancel_futures=True)
            self._release_keys()


def run_worker(settings: Settings, stop: threading.Event, instance_id: str | None = None,
               stats: EffectStats | None = None) -> EffectStats:
    """Run one effect worker until ``stop`` is set; its counters are ``stats`` (readable while it runs)."""
    worker = EffectWorker(settings, instance_id=instance_id, stats=stats)
    try:
        worker.run(stop)
    finally:
        worker.close()
    return worker.stats
