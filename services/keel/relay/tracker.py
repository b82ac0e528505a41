"""The status tracker: follows the events, dead-letter and effects topics into the outbox's status tables.

It reads ``read_committed`` in its own consumer group and commits offsets only after the
outbox transaction, so a crash replays records; applying one twice changes nothing
(events are kept by id, statuses only move forward, effects fold by position). One event
may end two commands: an approval event ends the parked command and the one that
approved, rejected or expired it (see ``keel.relay.status``). An event whose type has an
effect (in this process's registry, or named by the processor's ``keel-effect`` header)
opens the effect; workers' reports and outcome events move it on (``keel.effects.status``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import pydantic
from confluent_kafka import Consumer, Message, TopicPartition

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.domains.registry import current
from keel.effects.progress import EffectReport
from keel.effects.status import EffectChange, from_event, from_report, opened
from keel.errors import KeelError
from keel.kafka.clients import BATCHED_FETCH, consumer_config
from keel.kafka.reader import record_headers
from keel.kafka.topics import Topic, topic_name
from keel.outbox.models import Outcome
from keel.outbox.store import OutboxStore
from keel.processor.worker import EFFECT_HEADER
from keel.relay.status import dead_letter_outcome, event_outcomes, recorded_outcomes

log = logging.getLogger(__name__)

Learnt = tuple[list[Outcome], list[EffectChange]]


class StatusLearner:
    """What the tracker makes of records, apart from reading them: what each says, applied in one transaction."""

    def __init__(self, store: OutboxStore, settings: Settings, codec: EnvelopeCodec | None = None) -> None:
        self.store = store
        self.codec = codec or EnvelopeCodec()
        self.events_topic = topic_name(settings, Topic.EVENTS)
        self.dlq_topic = topic_name(settings, Topic.DLQ)
        self.effects_topic = topic_name(settings, Topic.EFFECTS)

    def apply(self, messages: Sequence[Message]) -> tuple[int, int]:
        """Learn from ``messages`` and apply it; returns how many statuses and effects changed, and how
        many outcomes and effect changes were applied."""
        outcomes: list[Outcome] = []
        effects: list[EffectChange] = []
        for message in messages:
            if message.error() is None:
                found, changes = self.learn(message)
                outcomes += found
                effects += changes
        changed = self.store.apply_outcomes(outcomes, effects) if outcomes or effects else 0
        return changed, len(outcomes) + len(effects)

    def learn(self, message: Message) -> Learnt:
        """What one record of the events, dead-letter or effects topic says."""
        if message.topic() == self.effects_topic:
            try:
                return [], [from_report(EffectReport.model_validate_json(message.value() or b""))]
            except pydantic.ValidationError as exc:  # not a report of this contract: nothing to fold
                log.info("tracker skipped a record of %s: %s", message.topic(), exc.errors()[0]["msg"])
                return [], []
        value = message.value() or b""
        try:
            record = self.codec.read(value)
            if message.topic() == self.dlq_topic:
                return [self._dead_lettered(message, self.codec.parse(record))], []
            if (outcomes := recorded_outcomes(record, value)) is not None:  # the usual event: no model
                change = opened(tenant_id=record["tenant_id"], aggregate_id=record["aggregate_id"],
                                event_id=record["id"], causation_id=record["causation_id"], event_type=record["type"],
                                provider=self._provider(message, record["type"]),
                                partition=message.partition(), offset=message.offset())
                return outcomes, [change] if change else []
            envelope = self.codec.parse(record)
        except KeelError as exc:  # not ours to fail on: unknown schemas, foreign bytes
            log.info("tracker skipped a record of %s: %s", message.topic(), exc)
            return [], []
        change = from_event(envelope, partition=message.partition(), offset=message.offset(),
                            provider=self._provider(message, envelope.type))
        return event_outcomes(envelope), [change] if change else []

    @staticmethod
    def _dead_lettered(message: Message, command: Envelope) -> Outcome:
        headers = _headers(message)
        return dead_letter_outcome(command, headers.get("keel-error-code") or "dead_lettered",
                                   headers.get("keel-error-reason") or "")

    @staticmethod
    def _provider(message: Message, event_type: str) -> str | None:
        """Who carries out the effect of ``event_type``'s events, if it has one: this process's
        registry says, or the processor's ``keel-effect`` header for a type it does not know."""
        effect = current().effect_of.get(event_type)
        return effect.provider if effect else _header(message, EFFECT_HEADER) or None


class StatusTracker:
    """One member of the tracker group; each owns some partitions of events, DLQ and effects."""

    def __init__(self, store: OutboxStore, settings: Settings,
                 codec: EnvelopeCodec | None = None) -> None:
        self.learner = StatusLearner(store, settings, codec)
        self.applied = 0
        self._consumer = Consumer(consumer_config(
            settings, f"{settings.topic_prefix}.tracker", **BATCHED_FETCH))
        self._consumer.subscribe([self.learner.events_topic, self.learner.dlq_topic, self.learner.effects_topic])

    def run_once(self, timeout_s: float = 0.5) -> int:
        """Apply one batch of records; returns how many statuses changed."""
        messages = self._consumer.consume(1000, timeout=timeout_s)
        changed, applied = self.learner.apply(messages)
        positions: dict[tuple[str, int], int] = {}
        for message in messages:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if topic is not None and partition is not None and offset is not None:
                positions[(topic, partition)] = offset + 1
        if positions:
            self._consumer.commit(offsets=[TopicPartition(topic, partition, offset) for
                                           (topic, partition), offset in positions.items()],
                                  asynchronous=False)
        self.applied += applied
        return changed

    def run(self, stop: threading.Event) -> None:
        """Track until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.run_once()
            except KeelError as exc:  # the outbox is down: records are read again later
                log.warning("status tracking failed: %s", exc)
                stop.wait(1.0)

    def close(self) -> None:
        """Leave the group."""
        self._consumer.close()


def _headers(message: Message) -> dict[str, str]:
    return {name: _text(value) for name, value in record_headers(message)}


def _header(message: Message, wanted: str) -> str:
    """One header's text ("" when absent), without decoding the others."""
    return next((_text(value) for name, value in record_headers(message) if name == wanted), "")


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")
