"""The relay's spans: one ``publish`` span per outbox row, in its command's trace.

The row holds only the encoded envelope, so its ``traceparent`` is read from the Avro
record (without validating the envelope: the gateway did). Built only when tracing is on.
"""

from __future__ import annotations

from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from keel.contracts.codec import EnvelopeCodec
from keel.errors import KeelError
from keel.observability import tracing
from keel.outbox.models import PendingRow


class PublishSpans:
    """Publish spans open from ``produce`` until Kafka's delivery report."""

    def __init__(self, topic: str, codec: EnvelopeCodec) -> None:
        self._topic = topic
        self._codec = codec
        self._open: dict[bytes, Span] = {}  # by the row's value, unique as its command id is

    def start(self, row: PendingRow) -> bytes:
        """Open ``row``'s span; returns its ``traceparent`` header value."""
        try:
            traceparent = self._codec.read(row.value).get("traceparent")
        except KeelError:
            traceparent = None
        span = tracing.tracer().start_span(
            f"publish {self._topic}", context=tracing.context_of(traceparent), kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "kafka", "messaging.operation.type": "send",
                        "messaging.destination.name": self._topic, "messaging.kafka.message.key": row.key,
                        "keel.tenant_id": row.key.split("/", 1)[0], "keel.command_id": str(row.command_id),
                        "keel.outbox.seq": row.seq})
        self._open[row.value] = span
        return (tracing.traceparent_of(span) or "").encode()

    def end(self, value: bytes, error: str | None) -> None:
        """Close the span of the row whose value is ``value`` once Kafka acknowledged (or refused) it."""
        span = self._open.pop(value, None)
        if span is None:
            return
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()
