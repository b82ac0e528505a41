"""The projection's spans: one per traced record, in the trace of the span that produced it.

A batch holds thousands of records of as many traces, so each sampled record (its
``traceparent`` header's sampled flag) gets its own short span, from the batch's first
read to its rows being stored, linked to nothing else; unsampled records cost nothing but
the header look-up. Spans are built after the insert, so they name only stored rows.
"""

from __future__ import annotations

import time

from opentelemetry.trace import SpanKind

from keel.observability import tracing

_SAMPLED = b"01"


def sampled(traceparent: bytes | None) -> bool:
    """Whether a ``traceparent`` header asks for its trace to be recorded."""
    return traceparent is not None and traceparent.endswith(_SAMPLED)


def projected(traces: list[tuple[bytes, int, int]], topic: str, table: str, token: str, opened_at: float) -> None:
    """Record a ``project`` span for each ``(traceparent, partition, offset)`` of a stored batch."""
    tracer = tracing.tracer()
    start = int(opened_at * 1e9) if opened_at else time.time_ns()
    for traceparent, partition, offset in traces:
        span = tracer.start_span(f"project {table}", context=tracing.context_of(traceparent), kind=SpanKind.CONSUMER,
                                 start_time=start, attributes={
                                     "messaging.system": "kafka", "messaging.operation.type": "process",
                                     "messaging.destination.name": topic, "messaging.kafka.partition": partition,
                                     "messaging.kafka.offset": offset, "db.system.name": "clickhouse",
                                     "db.collection.name": table, "keel.projection.token": token})
        span.end()
