"""Logging set-up: JSON lines for services, plain text for interactive commands.

Context fields (tenant, actor, command id, trace id) travel as ``extra=`` on a record
and land as top-level JSON keys, so logs can be filtered per tenant or command. Every
record also gets ``trace_id`` and ``span_id`` from the span current where it was logged
(``TraceContext``), so a log line joins its trace; a record about one command names it
with ``command_fields``, which also takes the trace id from the command's ``traceparent``
when no span records (tracing off).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Protocol

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _Command(Protocol):
    @property
    def tenant_id(self) -> str: ...
    @property
    def id(self) -> Any: ...
    @property
    def traceparent(self) -> str | None: ...


def command_fields(command: _Command) -> dict[str, Any]:
    """The ``extra=`` of a log call about one command (or event): tenant, command id, trace id."""
    from keel.observability.tracing import trace_id_of  # OpenTelemetry loads with the first such line

    fields: dict[str, Any] = {"tenant_id": command.tenant_id, "command_id": str(command.id)}
    trace_id = trace_id_of(command.traceparent)
    if trace_id is not None:
        fields["trace_id"] = trace_id
    return fields


class TraceContext(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` of the current span to a record that has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        from opentelemetry import trace  # imported by the first record, not by every CLI command

        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            if getattr(record, "trace_id", None) is None:
                record.trace_id = f"{context.trace_id:032x}"
            if getattr(record, "span_id", None) is None:
                record.span_id = f"{context.span_id:016x}"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(*, json_lines: bool, level: str = "INFO") -> None:
    """Route Keel's logs to stderr, as JSON lines for services or text for people."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines
                         else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(TraceContext())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
