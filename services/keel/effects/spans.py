"""An effect attempt's span, in the trace of the decision that asked for the effect.

Its parent is the span that produced the effect's event (the record's ``traceparent``
header; else the event's own, the command's). The span is current while the handler runs,
so ``keel.domains.http`` passes it on to the provider in a ``traceparent`` header, and the
outcome command carries it: its decision joins the same trace. Nothing is built when
tracing is off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from keel.effects.jobs import Job, Trigger
from keel.observability import tracing


@contextmanager
def attempt_span(job: Job, provider: str, trigger: Trigger) -> Iterator[Span | None]:
    """The current span of one attempt (``None`` when tracing is off); ``job`` keeps its context."""
    if not tracing.enabled():
        yield None
        return
    span = tracing.tracer().start_span(
        f"effect {provider}", context=tracing.context_of(trigger.traceparent or trigger.event.traceparent),
        kind=SpanKind.CLIENT, attributes={
            "keel.tenant_id": job.tenant_id, "keel.command_id": str(job.origin_command_id),
            "keel.effect_id": str(job.effect_id), "keel.effect.provider": provider,
            "keel.effect.attempt": job.attempts, "keel.effect.generation": job.generation,
            "keel.event_type": job.event_type})
    job.traceparent = tracing.traceparent_of(span)
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span
