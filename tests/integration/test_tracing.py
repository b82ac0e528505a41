"""One command's trace, from the HTTP request to its projected rows, approval wait included.

The gateway (uvicorn in a thread), relay, processor, status tracker, effect worker and
projector run in this process, against the real broker, SQLite outbox and chDB, all
exporting to one ``InMemorySpanExporter``. In-process rather than as processes exporting
OTLP to a test collector: the spans are read synchronously and exactly, with no collector
to write and no export timing to wait out, and nothing is lost in the trade. The hops
still share no context but the envelope bytes in the outbox and in Kafka and the records'
Kafka headers: each service's spans are started from what it read, never from a context
variable (the test checks parents by span id, so a leaked context would show).

Only the payments provider is a stand-in: a small HTTP server that records the
``traceparent`` each effect attempt sends it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from keel.client import KeelClient
from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind
from keel.effects.worker import EffectWorker
from keel.gateway.app import create_app
from keel.gateway.settings import IngressSettings
from keel.outbox.models import CommandStatus
from keel.processor.worker import CommandProcessor
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations
from keel.projector.projector import EventProjector
from keel.relay.relay import Relay
from keel.relay.tracker import StatusTracker
from tests.helpers import AGENT
from tests.platform import put_in_force, serving, sqlite_outbox

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ANN = Actor(kind=ActorKind.HUMAN, id="ann")
POLICY = {"version": "acme-trace", "roles": {"agent": ["IssueRefund", "StartSubscription"], "admin": ["*"]},
          "grants": {"agent:support-bot": ["agent"], "human:ann": ["admin"]},
          "rules": [{"name": "big", "decision": "approve", "match": {"payload": {"amount_cents": {"gt": 100_000}}}}]}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class _Payments(BaseHTTPRequestHandler):
    seen: list[str | None] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", "0")))
        type(self).seen.append(self.headers.get("traceparent"))
        body = json.dumps({"id": f"re_{uuid.uuid4().hex[:8]}"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture
def payments(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str | None]]:
    """A payments provider that answers every refund; yields the ``traceparent`` of each request."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Payments)
    _Payments.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SUPPORT_DESK_PAYMENTS_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield _Payments.seen
    finally:
        server.shutdown()


def _one(spans: Sequence[ReadableSpan], name: str, **attributes: object) -> ReadableSpan:
    found = [s for s in spans if s.name == name and all(
        (s.attributes or {}).get(k) == v for k, v in attributes.items())]
    assert len(found) == 1, f"{len(found)} spans {name} {attributes}: {[s.name for s in spans]}"
    return found[0]


def _print_tree(spans: Sequence[ReadableSpan]) -> None:
    """The trace as a tree, for ``pytest -s``."""
    children: dict[int | None, list[ReadableSpan]] = {}
    known = {s.context.span_id for s in spans if s.context is not None}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in known else None
        children.setdefault(parent, []).append(span)

    def show(parent: int | None, depth: int) -> None:
        for span in children.get(parent, []):
            extra = [e.name for e in span.events] + [f"link:{len(span.links)}"] * bool(span.links)
            print(f"{'  ' * depth}{span.name} {' '.join(extra)}")
            assert span.context is not None
            show(span.context.span_id, depth + 1)

    show(None, 0)


def _parent_of(child: ReadableSpan, parent: ReadableSpan) -> bool:
    context = parent.get_span_context()
    assert child.parent is not None and context is not None
    return child.parent.span_id == context.span_id and child.parent.trace_id == context.trace_id


def test_one_trace_follows_a_command_from_the_request_through_its_approval_to_the_projected_rows(
        settings: Settings, tmp_path: Path, spans: InMemorySpanExporter, payments: list[str | None]) -> None:
    processor = CommandProcessor(settings, instance_id="tracing")
    put_in_force(settings, processor, POLICY)
    outbox = sqlite_outbox(tmp_path, "acme")
    dsn, db, store, keys = outbox.dsn, outbox.store.db, outbox.store, outbox.keys
    bot, ann = keys.create_key("acme", AGENT)[1], keys.create_key("acme", ANN)[1]
    ingress = IngressSettings(outbox_dsn=dsn, gateway_key_cache_s=0)
    relay, tracker = Relay(store, settings, ingress), StatusTracker(store, settings)
    effects, stop = EffectWorker(settings, instance_id="tracing"), threading.Event()
    worker = threading.Thread(target=effects.run, args=(stop,), name="effects")
    worker.start()
    analytics = connect(settings)
    apply_migrations(analytics)

    def until(url: str, token: str, command_id: uuid.UUID, status: CommandStatus) -> None:
        deadline = time.monotonic() + 60
        with KeelClient(url, token) as client:
            while client.status(command_id).status is not status:
                assert time.monotonic() < deadline, f"{command_id} never became {status}"
                relay.run_once()
                processor.run_until_caught_up()
                tracker.run_once(0.2)

    try:
        with serving(create_app(settings.model_copy(update={"data_dir": tmp_path}), ingress)) as url:
            aggregate = f"sub-{uuid.uuid4().hex[:8]}"
            with KeelClient(url, bot) as client:
                started = client.submit("StartSubscription", aggregate, {
                    "customer_id": "cust-1", "plan": "pro", "monthly_price_cents": 500_000, "currency": "EUR"},
                    on_behalf_of="cust-1")
            until(url, bot, started.command_id, CommandStatus.EXECUTED)
            refund = uuid.uuid4()
            answer = httpx.post(f"{url}/v1/commands", headers={
                "authorization": f"Bearer {bot}", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}, json={
                "id": str(refund), "type": "IssueRefund", "aggregate_id": aggregate, "on_behalf_of": "cust-1",
                "payload": {"amount_cents": 200_000, "currency": "EUR", "reason": "outage", "confidence": 0.7}})
            assert answer.status_code == 202, answer.text
            until(url, bot, refund, CommandStatus.PENDING_APPROVAL)
            with KeelClient(url, ann) as client:
                approval = client.approve(refund, comment="known outage").command_id
            until(url, ann, approval, CommandStatus.EXECUTED)
            deadline = time.monotonic() + 60
            while not any(s.name == "decide CompleteEffect" for s in spans.get_finished_spans()):
                assert time.monotonic() < deadline, "the refund's effect never completed"
                processor.run_until_caught_up()
                time.sleep(0.1)
        with EventProjector(settings, analytics) as projector:
            projector.catch_up()
        projected = analytics.query(
            "SELECT type, traceparent FROM events WHERE aggregate_id = {a:String} AND type = 'RefundIssued'",
            parameters={"a": aggregate}).result_rows
    finally:
        stop.set()
        worker.join(30)
        effects.close()
        relay.close()
        tracker.close()
        processor.close()
        analytics.close()
        db.close()

    finished = spans.get_finished_spans()
    trace = [s for s in finished if s.context is not None and f"{s.context.trace_id:032x}" == CLIENT_TRACE]
    _print_tree(trace)
    ids = {"keel.command_id": str(refund)}

    # The gateway continues the client's trace; the envelope carries the request span on.
    request = _one(trace, "POST /v1/commands")
    assert request.kind is SpanKind.SERVER and request.parent is not None
    assert f"{request.parent.span_id:016x}" == CLIENT_SPAN
    publish = _one(trace, f"publish {settings.topic_prefix}.commands", **ids)
    assert publish.kind is SpanKind.PRODUCER and _parent_of(publish, request)

    # The processor decides it from the relay's header, and parks it: the wait begins.
    decide = _one(trace, "decide IssueRefund", **ids)
    assert _parent_of(decide, publish) and decide.attributes and decide.attributes["keel.outcome"] == "pending"
    assert [e.name for e in decide.events] == ["approval.requested"]

    # The approver's command has its own trace; the refund resumes in the refund's, linked to it.
    approve = _one(finished, "decide ApproveCommand", **{"keel.command_id": str(approval)})
    assert approve.context is not None and f"{approve.context.trace_id:032x}" != CLIENT_TRACE
    resume = _one(trace, "resume IssueRefund", **ids)
    assert _parent_of(resume, request), "the resumed execution continues the command's own trace"
    assert any(link.context.span_id == approve.context.span_id for link in resume.links)
    assert [e.name for e in resume.events] == ["approval.granted"]
    assert resume.context is not None
    assert any(link.context.span_id == resume.context.span_id for link in approve.links)

    # The effect runs under the resumed decision; the provider and the outcome continue the trace.
    effect = _one(trace, "effect payments")
    assert effect.kind is SpanKind.CLIENT and _parent_of(effect, resume)
    assert effect.context is not None
    assert payments == [f"00-{CLIENT_TRACE}-{effect.context.span_id:016x}-01"]
    outcome = _one(trace, "decide CompleteEffect")
    assert _parent_of(outcome, effect)

    # The refund's rows are projected under the decision that wrote them, its request's traceparent kept.
    project = [s for s in trace if s.name == "project events"]
    assert any(_parent_of(s, resume) for s in project), "RefundIssued's projection"
    assert any(_parent_of(s, decide) for s in project), "ApprovalRequested's projection"
    assert any(_parent_of(s, outcome) for s in project), "EffectSucceeded's projection"
    assert [row[1].split("-")[1] for row in projected] == [CLIENT_TRACE]

    # Every span of the trace ended with its transaction committed.
    assert all(s.status.is_ok for s in trace), [(s.name, s.status.description) for s in trace if not s.status.is_ok]


def test_the_standard_variables_turn_a_service_s_exporter_on(tmp_path: Path) -> None:
    """In a fresh process (the global provider is set once per process): the console exporter
    prints a span under the service's default name; with ``OTEL_SDK_DISABLED`` nothing is built."""
    import os
    import subprocess
    import sys

    script = ("from keel.observability import tracing\n"
              "on = tracing.configure_tracing('relay')\n"
              "tracing.tracer().start_span('probe').end()\n"
              "tracing.shutdown()\n"
              "print('ON' if on else 'OFF')\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}

    def run(**env: str) -> str:
        done = subprocess.run([sys.executable, "-c", script], env={**base, **env}, capture_output=True, text=True,
                              timeout=60, check=True)
        return done.stdout

    printed = run(OTEL_TRACES_EXPORTER="console")
    assert printed.rstrip().endswith("ON") and '"name": "probe"' in printed and '"service.name": "keel-relay"' in printed
    assert run(OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="true").strip() == "OFF"
    assert run().strip() == "OFF"


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: decodes each export with opentelemetry-proto."""

    spans: list[tuple[str, str, str, str, str]] = []  # service, name, trace id, span id, parent span id

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        import gzip

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
            service = next(a.value.string_value for a in resource.resource.attributes if a.key == "service.name")
            for scope in resource.scope_spans:
                type(self).spans += [(service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex())
                                     for s in scope.spans]
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_args: object) -> None:
        return


def test_services_run_as_processes_export_one_trace_over_otlp(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `keel` commands set tracing up from ``OTEL_*``: gateway, relay, processor, effect worker and
    projector, each its own process, export to a collector, and the spans make one trace."""
    from tests.platform import running_platform

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    _Collector.spans = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    policy = {"version": "otlp", "roles": {"agent": ["StartSubscription", "IssueRefund"]},
              "grants": {"agent:support-bot": ["agent"]}, "rules": []}
    wanted = {("keel-gateway", "POST /v1/commands"), ("keel-relay", f"publish {settings.topic_prefix}.commands"),
              ("keel-processor", "decide IssueRefund"), ("keel-effects", "effect payments"),
              ("keel-processor", "decide CompleteEffect"), ("keel-projector", "project events")}
    try:
        with running_platform(settings, tmp_path, [AGENT], policy,
                              extra=lambda _gateway: {"project": ["project", "--follow"]}) as running:
            token, aggregate = running.tokens[AGENT.id], f"sub-{uuid.uuid4().hex[:8]}"
            with KeelClient(running.gateway, token) as client:
                client.wait(client.submit("StartSubscription", aggregate, {
                    "customer_id": "cust-1", "plan": "pro", "monthly_price_cents": 500_000, "currency": "EUR"},
                    on_behalf_of="cust-1").command_id, "executed", timeout_s=90)
            answer = httpx.post(f"{running.gateway}/v1/commands", headers={
                "authorization": f"Bearer {token}", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}, json={
                "type": "IssueRefund", "aggregate_id": aggregate, "on_behalf_of": "cust-1",
                "payload": {"amount_cents": 500, "currency": "EUR", "reason": "outage"}})
            assert answer.status_code == 202, answer.text
            deadline = time.monotonic() + 60
            while not wanted <= {(s[0], s[1]) for s in _Collector.spans if s[2] == CLIENT_TRACE}:
                assert time.monotonic() < deadline, sorted({(s[0], s[1]) for s in _Collector.spans
                                                            if s[2] == CLIENT_TRACE})
                time.sleep(0.2)
    finally:
        server.shutdown()
    trace = [s for s in _Collector.spans if s[2] == CLIENT_TRACE]
    by_id = {s[3]: s for s in trace}

    def parent(child: tuple[str, str, str, str, str]) -> str:
        return by_id[child[4]][1] if child[4] in by_id else child[4]

    named = {s[1]: s for s in trace if s[1] != "project events"}
    assert parent(named["POST /v1/commands"]) == CLIENT_SPAN
    assert parent(named[f"publish {settings.topic_prefix}.commands"]) == "POST /v1/commands"
    assert parent(named["decide IssueRefund"]) == f"publish {settings.topic_prefix}.commands"
    assert parent(named["effect payments"]) == "decide IssueRefund"
    assert parent(named["decide CompleteEffect"]) == "effect payments"
    assert {parent(s) for s in trace if s[1] == "project events"} >= {"decide IssueRefund", "decide CompleteEffect"}
