"""OpenTelemetry traces across Keel's hops: on only when the standard ``OTEL_*`` variables say so.

A command's W3C trace context travels in the envelope's ``traceparent`` (the gateway sets
it from its request span, so it survives the outbox) and in a ``traceparent`` Kafka header
on every record a hop produces for it (relay publish, processor decision), so the next hop's
span is a child of the previous hop's. Hot loops test ``enabled()`` once per batch or per
record and skip every tracing call when it is off: the default is OpenTelemetry's no-op
tracer, no exporter, no span objects.

Tracing is on when ``OTEL_SDK_DISABLED`` is not true and either ``OTEL_TRACES_EXPORTER``
names an exporter (``otlp``, ``console``) or an OTLP endpoint is set
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). The exporter,
the batch processor, the sampler and the resource then read their own ``OTEL_*`` variables.
Only OTLP over HTTP/protobuf ships (no gRPC stack in the gateway's process).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags, Tracer

if TYPE_CHECKING:  # the SDK loads only where tracing is on: every CLI command imports this module
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

HEADER = "traceparent"
"""The Kafka header (and HTTP header) that carries the W3C trace context."""
_TRUE = {"true", "1", "yes"}

_tracer: Tracer = trace.NoOpTracer()
_provider: TracerProvider | None = None


def enabled() -> bool:
    """Whether spans are recorded in this process (checked by hot loops before any tracing call)."""
    return _provider is not None


def tracer() -> Tracer:
    """Keel's tracer: the no-op tracer unless ``configure_tracing`` or ``use`` installed a provider."""
    return _tracer


def provider() -> TracerProvider | None:
    """The installed SDK provider, for instrumentations that take one; ``None`` when off."""
    return _provider


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    exporters = _exporter_names(env)
    if exporters is not None:
        return bool(exporters)
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install a provider exporting as the ``OTEL_*`` variables say; returns whether tracing is on.

    ``service`` names the resource unless ``OTEL_SERVICE_NAME`` does (``keel-<service>``).
    """
    env = os.environ if environ is None else environ
    if _provider is not None or not wanted(env):
        return enabled()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or f"keel-{service}"})
    sdk = TracerProvider(resource=resource)
    for exporter in _exporters(_exporter_names(env) or ["otlp"]):
        sdk.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(sdk)  # so third-party instrumentations find it too
    use(sdk)
    log.info("tracing on", extra={"service": resource.attributes.get("service.name")})
    return True


def use(sdk: TracerProvider | None) -> None:
    """Trace through ``sdk`` (tests pass one with an in-memory exporter); ``None`` turns tracing off."""
    global _tracer, _provider
    _provider = sdk
    _tracer = sdk.get_tracer("keel") if sdk is not None else trace.NoOpTracer()


def shutdown() -> None:
    """Export what is buffered; for a clean exit (the SDK also does it at interpreter exit)."""
    if _provider is not None:
        _provider.shutdown()


def _exporter_names(env: Mapping[str, str]) -> list[str] | None:
    raw = env.get("OTEL_TRACES_EXPORTER")
    if raw is None or not raw.strip():
        return None
    return [name for name in (part.strip().lower() for part in raw.split(",")) if name and name != "none"]


def _exporters(names: Iterable[str]) -> list[SpanExporter]:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    chosen: list[SpanExporter] = []
    for name in names:
        if name == "console":
            chosen.append(ConsoleSpanExporter())
        elif name == "otlp":
            if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") != "http/protobuf":
                log.warning("only OTLP over http/protobuf is installed; exporting with it")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            chosen.append(OTLPSpanExporter())
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r ignored", name)
    return chosen


# -- W3C trace context as text ------------------------------------------------------------


def parse(traceparent: str | bytes | None) -> SpanContext | None:
    """The remote span context a ``traceparent`` value names; ``None`` if absent or malformed.

    Written out (rather than through the propagator's carrier API) because it runs per record.
    """
    if not traceparent:
        return None
    text = traceparent.decode("ascii", "replace") if isinstance(traceparent, bytes) else traceparent
    parts = text.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or parts[0] == "ff":
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0xFF))


def context_of(traceparent: str | bytes | None) -> Context | None:
    """A parent context for a span that continues ``traceparent``'s trace (``None``: a new trace)."""
    remote = parse(traceparent)
    return trace.set_span_in_context(NonRecordingSpan(remote)) if remote is not None else None


def format_context(context: SpanContext) -> str | None:
    """``context`` as a ``traceparent`` value; ``None`` for an invalid (no-op) context."""
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def traceparent_of(span: Span) -> str | None:
    """``span``'s context as a ``traceparent`` value."""
    return format_context(span.get_span_context())


def current_traceparent() -> str | None:
    """The current span's context as a ``traceparent`` value, when a span is recording here."""
    return format_context(trace.get_current_span().get_span_context()) if enabled() else None


def trace_id_of(traceparent: str | None) -> str | None:
    """The 32-hex trace id inside a ``traceparent`` value (logs carry it even with tracing off)."""
    remote = parse(traceparent)
    return f"{remote.trace_id:032x}" if remote is not None else None


def header(headers: Iterable[tuple[str, str | bytes | None]]) -> bytes | None:
    """The ``traceparent`` header among a record's headers."""
    for name, value in headers:
        if name == HEADER and value is not None:
            return value.encode() if isinstance(value, str) else value
    return None


# -- HTTP: OpenTelemetry's maintained instrumentations ------------------------------------

_NOT_TRACED = "healthz,readyz,livez,metrics"


def asgi_traced(app: Any, name: str) -> Any:
    """``app`` (an ASGI callable) behind OpenTelemetry's ASGI middleware: one server span named
    ``name`` per request, continuing the request's ``traceparent`` header."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app, default_span_details=lambda _scope: (name, {}), tracer_provider=_provider,
                                   exclude_spans=["receive", "send"], excluded_urls=_NOT_TRACED)


def instrument_fastapi(app: Any) -> None:
    """Trace ``app``'s routes with OpenTelemetry's FastAPI instrumentation, when tracing is on."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=_provider, excluded_urls=_NOT_TRACED,
                                       exclude_spans=["receive", "send"])
