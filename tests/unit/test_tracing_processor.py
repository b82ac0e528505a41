"""The processor's spans, without Kafka: a decision continues its record's trace, a resumed command
its own, and each event record carries the span that wrote it."""

from __future__ import annotations

import uuid
from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.commands import ApproveCommand
from keel.domain.events import ApprovalGranted, ApprovalRequested
from keel.domain.governance.pipeline import Decision
from keel.domain.outcomes import to_events
from keel.observability import tracing
from keel.processor.spans import BatchSpans
from keel.processor.worker import Chunk, Outputs, decided_records
from support_desk.messages import RefundIssued
from tests.helpers import command, refund

AGENT_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
RELAY_SPAN = b"00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"
APPROVER_TRACE = "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-2222222222222222-01"


def _requested(cmd_id: uuid.UUID) -> ApprovalRequested:
    fields: dict[str, Any] = {name: None for name in ApprovalRequested.model_fields}
    fields.update(command_id=cmd_id)
    return ApprovalRequested.model_construct(**fields)


def test_a_parked_decision_is_a_child_of_its_record_and_says_it_waits(spans: InMemorySpanExporter) -> None:
    parked = command("acme", "sub-1", refund(500_000), traceparent=AGENT_TRACE)
    events = to_events(parked, [_requested(parked.id)], version=1, now=parked.occurred_at)
    batch = BatchSpans("t.commands", 1)
    headers = batch.decided(RELAY_SPAN, parked, Decision(events, origin_type="IssueRefund"), "pending", "")
    batch.end()
    finished = {s.name: s for s in spans.get_finished_spans()}
    decide, transaction = finished["decide IssueRefund"], finished["processor transaction"]
    assert decide.parent is not None and f"{decide.parent.span_id:016x}" == "1111111111111111"
    assert [e.name for e in decide.events] == ["approval.requested"]
    assert transaction.context is not None and [link.context.span_id for link in decide.links] == [
        transaction.context.span_id]
    assert decide.context is not None
    assert headers == {parked.id: f"{AGENT_TRACE[:36]}{decide.context.span_id:016x}-01".encode()}


def test_an_approval_resumes_the_parked_command_in_its_own_trace_linked_both_ways(
        spans: InMemorySpanExporter) -> None:
    parked = command("acme", "sub-1", refund(500_000), traceparent=AGENT_TRACE)
    approval = command("acme", "sub-1", ApproveCommand(command_id=parked.id), traceparent=APPROVER_TRACE)
    granted = to_events(approval, [ApprovalGranted(command_id=parked.id, approver="human:ann")], version=1,
                        now=approval.occurred_at)
    executed = to_events(approval, [RefundIssued(amount_cents=500_000, currency="EUR", reason="test")], version=2,
                         now=approval.occurred_at, origin=parked, first_index=1)
    decision = Decision(granted + executed, origin_type="IssueRefund")
    batch = BatchSpans("t.commands", 1)
    headers = batch.decided(None, approval, decision, "accepted", "")
    chunk = Chunk()
    decided_records(decision, EnvelopeCodec(), Outputs.of(Settings(topic_prefix="unit")), b"acme/sub-1", 0, chunk,
                    headers)
    batch.end()
    finished = {s.name: s for s in spans.get_finished_spans()}
    decide, resume = finished["decide ApproveCommand"], finished["resume IssueRefund"]
    assert decide.context is not None and resume.context is not None and resume.parent is not None
    assert f"{decide.context.trace_id:032x}" == APPROVER_TRACE.split("-")[1]
    assert f"{resume.context.trace_id:032x}" == AGENT_TRACE.split("-")[1]
    assert f"{resume.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert decide.context.span_id in {link.context.span_id for link in resume.links}
    assert resume.context.span_id in {link.context.span_id for link in decide.links}
    assert [e.name for e in resume.events] == ["approval.granted"]
    traced = [dict(h)[tracing.HEADER] for _, _, _, _, h in chunk.take("intake") if h]
    assert traced == [headers[approval.id], headers[parked.id]]  # the events topic's; the audit intake has no headers


def test_an_aborted_transaction_marks_every_span_of_its_batch(spans: InMemorySpanExporter) -> None:
    cmd = command("acme", "sub-1", refund(5))
    batch = BatchSpans("t.commands", 2)
    batch.duplicate(None, cmd)
    batch.dead_letter(RELAY_SPAN, "key_mismatch", "wrong key")
    batch.end("fenced")
    finished = spans.get_finished_spans()
    assert {s.name for s in finished} == {"decide IssueRefund", "dead-letter", "processor transaction"}
    assert all(s.status.status_code is StatusCode.ERROR for s in finished)
    assert all("transaction aborted: fenced" in (s.status.description or "") for s in finished)


def test_without_tracing_the_event_records_keep_their_shared_headers() -> None:
    cmd = command("acme", "sub-1", refund(5), traceparent=AGENT_TRACE)
    [event] = to_events(cmd, [RefundIssued(amount_cents=5, currency="EUR", reason="test")], version=1,
                        now=cmd.occurred_at)
    chunk = Chunk()
    decided_records(Decision([event], origin_type="IssueRefund"), EnvelopeCodec(),
                    Outputs.of(Settings(topic_prefix="unit")), b"acme/sub-1", 0, chunk)
    decided_records(Decision([event], origin_type="IssueRefund"), EnvelopeCodec(),
                    Outputs.of(Settings(topic_prefix="unit")), b"acme/sub-1", 0, chunk)
    records = chunk.take("intake")
    shared = records[0][4]
    assert shared is not None
    assert tracing.HEADER not in dict(shared) and records[2][4] is None  # the audit intake's: none
    assert records[1][4] is shared  # one list per pair of types, not one per record
    assert not tracing.enabled()
