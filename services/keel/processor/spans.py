"""The processor's spans, built only when tracing is on.

A batch has one span of its own (the transaction: its records, its commit or abort); each
command's ``decide`` span is a child of the span that published the command (the record's
``traceparent`` header; else the envelope's), linked to the batch span. A decision that
resumes a parked command (an approval) also opens a ``resume`` span in the *parked*
command's trace, linked to the approver's decision, so that trace shows the wait and what
ended it; the span that asked for approval carries an ``approval.requested`` event. The
events' records carry the span that produced them as their ``traceparent`` header, for the
effect workers and the projector. Every span ends when the transaction ends, so a span
says what was committed (or that it was aborted and will be decided again).
"""

from __future__ import annotations

import uuid

from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from keel.domain.envelope import Envelope
from keel.domain.governance.pipeline import Decision
from keel.observability import tracing


class BatchSpans:
    """The open spans of one batch, ended together with its transaction."""

    def __init__(self, topic: str, records: int) -> None:
        self._tracer = tracing.tracer()
        self._topic = topic
        self.batch = self._tracer.start_span("processor transaction", attributes={
            "messaging.system": "kafka", "messaging.operation.type": "process",
            "messaging.batch.message_count": records, "messaging.destination.name": topic})
        self._links = [Link(self.batch.get_span_context())]
        self._spans: list[Span] = []

    def decided(self, header: bytes | None, command: Envelope, decision: Decision, outcome: str,
                code: str) -> dict[uuid.UUID, bytes]:
        """Spans for one decision; returns the ``traceparent`` header per causing command id."""
        span = self._start(f"decide {command.type}", header or command.traceparent, command, outcome)
        if code:
            span.set_attribute("keel.rejection_code", code)
        if outcome == "pending":
            span.add_event("approval.requested", {"keel.command_id": str(command.id)})
        own = (tracing.traceparent_of(span) or "").encode()
        headers = {command.id: own}
        resumed = next((e for e in decision.events if e.causation_id not in (None, command.id)), None)
        if resumed is not None and resumed.causation_id is not None:
            # The approved command runs now, in its own trace, on the approver's decision.
            origin = self._tracer.start_span(
                f"resume {decision.origin_type}", context=tracing.context_of(resumed.traceparent),
                kind=SpanKind.CONSUMER,
                links=[Link(span.get_span_context(), {"keel.link": "approval"}), *self._links],
                attributes={"keel.tenant_id": command.tenant_id, "keel.command_id": str(resumed.causation_id),
                            "keel.approval_command_id": str(command.id)})
            origin.add_event("approval.granted", {"keel.approval_command_id": str(command.id),
                                                  "keel.approver": f"{command.actor.kind}:{command.actor.id}"})
            span.add_link(origin.get_span_context(), {"keel.link": "resumed"})
            self._spans.append(origin)
            headers[resumed.causation_id] = (tracing.traceparent_of(origin) or "").encode()
        return headers

    def duplicate(self, header: bytes | None, command: Envelope) -> None:
        """A span for a command acknowledged as a duplicate."""
        self._start(f"decide {command.type}", header or command.traceparent, command, "duplicate")

    def dead_letter(self, header: bytes | None, code: str, reason: str) -> None:
        """A span for a record sent to the dead letters."""
        span = self._tracer.start_span("dead-letter", context=tracing.context_of(header), kind=SpanKind.CONSUMER,
                                       links=self._links, attributes={"keel.dead_letter.code": code})
        span.set_status(Status(StatusCode.ERROR, reason[:200]))
        self._spans.append(span)

    def end(self, error: str | None = None) -> None:
        """End every span: the transaction committed, or (``error``) it was aborted."""
        for span in (*self._spans, self.batch):
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, f"transaction aborted: {error}"))
            span.end()
        self._spans.clear()

    def _start(self, name: str, parent: str | bytes | None, command: Envelope, outcome: str) -> Span:
        # Few attributes: each costs the hot loop; what is the same for the batch is on the batch span.
        span = self._tracer.start_span(name, context=tracing.context_of(parent), kind=SpanKind.CONSUMER,
                                       links=self._links, attributes={
                                           "keel.tenant_id": command.tenant_id, "keel.command_id": str(command.id),
                                           "keel.outcome": outcome})
        self._spans.append(span)
        return span
