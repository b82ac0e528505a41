"""Tracing's switch and W3C trace context as text, without I/O: off unless ``OTEL_*`` ask for it."""

from __future__ import annotations

import json
import uuid

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind
from keel.domain.principal import Principal
from keel.gateway.intake import admit
from keel.observability import tracing

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BOT = Principal(tenant_id="acme", actor=Actor(kind=ActorKind.AGENT, id="bot"), roles=frozenset({"agent"}))


@pytest.mark.parametrize(("environ", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "keel-x"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
])
def test_tracing_is_wanted_only_when_the_standard_variables_ask_for_it(environ: dict[str, str], on: bool) -> None:
    assert tracing.wanted(environ) is on


def test_unset_variables_leave_the_no_op_tracer_and_nothing_to_propagate() -> None:
    assert not tracing.configure_tracing("unit", {})
    assert not tracing.enabled() and tracing.provider() is None
    assert isinstance(tracing.tracer(), trace.NoOpTracer)
    assert tracing.current_traceparent() is None


def test_a_traceparent_round_trips_and_bad_ones_start_no_trace() -> None:
    context = tracing.parse(TRACEPARENT)
    assert context is not None and context.is_remote and context.trace_flags.sampled
    assert tracing.format_context(context) == TRACEPARENT
    assert tracing.parse(TRACEPARENT.encode()) == context
    assert tracing.trace_id_of(TRACEPARENT) == "4bf92f3577b34da6a3ce929d0e0e4736"
    for bad in (None, "", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "00-xyz-00f067aa0ba902b7-01",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"):
        assert tracing.parse(bad) is None and tracing.context_of(bad) is None


def test_a_span_started_from_a_header_continues_its_trace(spans: InMemorySpanExporter) -> None:
    headers = [("keel-principal-tenant", b"acme"), (tracing.HEADER, TRACEPARENT.encode())]
    with tracing.tracer().start_as_current_span("child", context=tracing.context_of(tracing.header(headers))):
        current = tracing.current_traceparent()
    [child] = spans.get_finished_spans()
    assert child.parent is not None and f"{child.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert current is not None and current.split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.header([("other", b"x")]) is None


def test_the_gateway_puts_the_request_span_in_the_envelope_without_changing_the_request() -> None:
    body = {"id": str(uuid.uuid4()), "type": "IssueRefund", "aggregate_id": "sub-1", "traceparent": "00-" + "1" * 32
            + "-" + "2" * 16 + "-01", "payload": {"amount_cents": 5, "currency": "EUR", "reason": "r"}}
    raw = json.dumps(body).encode()
    kept, kept_row = admit(raw, BOT, EnvelopeCodec())
    traced, traced_row = admit(raw, BOT, EnvelopeCodec(), traceparent=TRACEPARENT)
    assert kept.traceparent == body["traceparent"] and traced.traceparent == TRACEPARENT
    assert EnvelopeCodec().decode(traced_row.value).traceparent == TRACEPARENT  # what the outbox stores
    assert traced_row.request_hash == kept_row.request_hash  # a retried request is still the same one
