"""The ``spans`` fixture: tracing on in this process, into memory, and off again afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keel.observability import tracing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process finishes, read with ``spans.get_finished_spans()``."""
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.use(None)
        provider.shutdown()
