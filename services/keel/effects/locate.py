"""Reading the one event a retried effect names (``EffectRetried``'s partition and offset).

``RetryEffect`` says where the effect's event is; the worker reads that record with a
consumer of its own, assigned there, and checks it is the effect's event before running
it again. Blocking: the worker calls it from a thread.
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.effects.jobs import Located, Trigger
from keel.errors import KeelError
from keel.kafka.clients import loader_config
from keel.kafka.reader import record_headers
from keel.kafka.topics import Topic, topic_name
from keel.effects.intake import header_text
from keel.observability import tracing
from keel.processor.worker import COMMAND_TYPE_HEADER, EFFECT_HEADER

READ_TIMEOUT_S = 30.0


class EventLocator:
    """Reads single records of the events topic by position."""

    def __init__(self, settings: Settings, codec: EnvelopeCodec) -> None:
        self._topic = topic_name(settings, Topic.EVENTS)
        self._codec = codec
        self._consumer = Consumer(loader_config(settings, f"{settings.topic_prefix}.effects.locator"))

    def read(self, where: Located, effect_id: uuid.UUID) -> Trigger | None:
        """The event at ``where`` if it is effect ``effect_id``'s; ``None`` if it is not there."""
        self._consumer.assign([TopicPartition(self._topic, where.partition, where.offset)])
        deadline = time.monotonic() + READ_TIMEOUT_S
        while time.monotonic() < deadline:
            message = self._consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    return None
                raise KafkaException(error)
            if message.offset() != where.offset:  # aborted, or gone: the reader skipped past it
                return None
            try:
                event = self._codec.decode(message.value() or b"")
            except KeelError:
                return None
            if event.id != effect_id:
                return None
            headers = dict(record_headers(message))
            return Trigger(event, header_text(headers, COMMAND_TYPE_HEADER), header_text(headers, EFFECT_HEADER),
                           header_text(headers, tracing.HEADER))
        return None

    def close(self) -> None:
        self._consumer.close()
