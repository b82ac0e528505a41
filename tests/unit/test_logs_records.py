"""The shape of a service's log line: JSON with tenant, command id and trace id where they apply."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from keel.logs import JsonFormatter, TraceContext, command_fields
from keel.observability import tracing
from tests.helpers import command, refund

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines through the filter ``configure_logging`` installs."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContext())
    logger = logging.getLogger("keel.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(handler)


def _last(out: io.StringIO) -> dict[str, object]:
    return json.loads(out.getvalue().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_line_about_a_command_names_its_tenant_command_and_trace(
        lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = lines
    cmd = command("acme", "sub-1", refund(5), traceparent=TRACEPARENT)
    logger.info("duplicate command acknowledged", extra=command_fields(cmd))
    line = _last(out)
    assert {k: line[k] for k in ("level", "logger", "message", "tenant_id", "command_id", "trace_id")} == {
        "level": "info", "logger": "keel.test-logs", "message": "duplicate command acknowledged",
        "tenant_id": "acme", "command_id": str(cmd.id), "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert "span_id" not in line  # no span recorded here: the command's trace id alone


def test_a_line_logged_inside_a_span_carries_its_trace_and_span_ids(
        lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = lines
    tracing.use(TracerProvider())
    try:
        with tracing.tracer().start_as_current_span("decide", context=tracing.context_of(TRACEPARENT)) as span:
            logger.warning("provider slow", extra={"tenant_id": "acme"})
            context = span.get_span_context()
    finally:
        tracing.use(None)
    line = _last(out)
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["span_id"] == f"{context.span_id:016x}" and line["tenant_id"] == "acme"


def test_a_trace_id_given_by_the_call_wins_and_a_line_outside_any_trace_has_none(
        lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = lines
    tracing.use(TracerProvider())
    try:
        with tracing.tracer().start_as_current_span("batch"):
            logger.info("about another command", extra={"trace_id": "f" * 32})
    finally:
        tracing.use(None)
    assert _last(out)["trace_id"] == "f" * 32
    logger.info("relay holds the outbox lease")
    assert "trace_id" not in _last(out) and "span_id" not in _last(out)


def test_a_command_without_a_traceparent_still_names_tenant_and_command() -> None:
    cmd = command("acme", "sub-1", refund(5))
    assert command_fields(cmd) == {"tenant_id": "acme", "command_id": str(cmd.id)}
