"""What an effect worker writes: outcome and breaker commands, and progress reports.

Commands go to the commands topic through an idempotent ``acks=all`` producer, keyed
``tenant/aggregate`` like any producer's, with the producing tenant in the principal header.
``command`` returns a future that resolves once Kafka acknowledged the record: an effect
counts as done (its offset may be committed) only then. Reports go to the effects topic;
a lost report costs a stale status line, never an effect, so nobody waits for them.

Delivery reports are served by ``poll`` on the worker's event loop, so the futures are
resolved on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from confluent_kafka import KafkaError, Message, Producer

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.effects.progress import EffectReport
from keel.errors import DeliveryError
from keel.kafka.clients import producer_config
from keel.kafka.topics import Topic, topic_name
from keel.sdk.producer import PRINCIPAL_TENANT_HEADER

log = logging.getLogger(__name__)


class Sender:
    """One producer for a worker's commands and reports."""

    def __init__(self, settings: Settings, codec: EnvelopeCodec) -> None:
        self._codec = codec
        self._commands = topic_name(settings, Topic.COMMANDS)
        self._reports = topic_name(settings, Topic.EFFECTS)
        self._producer = Producer(producer_config(settings))

    def command(self, command: Envelope) -> asyncio.Future[None]:
        """Send ``command``; the future resolves when Kafka acknowledged it (``DeliveryError`` if never)."""
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if acked.done():
                return
            if error is None:
                acked.set_result(None)
            else:
                acked.set_exception(DeliveryError(f"{command.type} {command.id} was not delivered: {error.str()}"))

        self._produce(self._commands, self._codec.encode(command), command.key,
                      [(PRINCIPAL_TENANT_HEADER, command.tenant_id.encode())], on_delivery)
        return acked

    def report(self, report: EffectReport) -> None:
        """Send ``report`` without waiting for it."""
        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                log.warning("an effect report was not delivered: %s", error.str(),
                            extra={"effect_id": str(report.effect_id)})

        self._produce(self._reports, report.model_dump_json().encode(), report.key, None, on_delivery)

    def _produce(self, topic: str, value: bytes, key: str, headers: list[tuple[str, str | bytes | None]] | None,
                 on_delivery: Callable[[KafkaError | None, Message], None]) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key.encode(), headers=headers, on_delivery=on_delivery)
                return
            except BufferError:  # the local queue is full: serve delivery reports, then try again
                self._producer.poll(0.05)

    def poll(self) -> None:
        """Serve the delivery reports that arrived (resolving their futures)."""
        self._producer.poll(0)

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every record to be delivered; how many are still queued."""
        return self._producer.flush(timeout_s)
