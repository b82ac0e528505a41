"""The gateway's typed errors and the HTTP status each error code answers with.

Every refusal is ``{"error": {"code", "field", "message"}}``; clients branch on ``code``.
"""

from __future__ import annotations

from keel.errors import KeelError


class WrongTenant(KeelError):
    """The body names a tenant other than the API key's."""

    code = "wrong_tenant"


class WrongActor(KeelError):
    """The body names an actor other than the API key's."""

    code = "wrong_actor"


class IdempotencyConflict(KeelError):
    """The command id was accepted before with a different body."""

    code = "idempotency_conflict"


class BodyTooLarge(KeelError):
    """The body is larger than the gateway accepts."""

    code = "payload_too_large"


class NotFound(KeelError):
    """No command with this id belongs to the caller's tenant."""

    code = "not_found"


class NotExplainable(KeelError):
    """The command is one of Keel's own (approvals, controls, effects), which the policy's rules do not govern."""

    code = "not_explainable"


class ControlsUnavailable(KeelError):
    """The controls topic is not read to its end yet (the broker is away): no answer under half-read switches."""

    code = "controls_unavailable"


HTTP_STATUS: dict[str, int] = {
    "malformed_json": 400,
    "client_disconnected": 400,
    "missing_key": 401,
    "invalid_key": 401,
    "wrong_tenant": 403,
    "wrong_actor": 403,
    "not_found": 404,
    "idempotency_conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "unknown_type": 422,
    "unknown_schema": 422,
    "schema_violation": 422,
    "not_a_command": 422,
    "not_explainable": 422,
    "beyond_dedupe_window": 422,
    "personal_data_without_subject": 422,  # personal values need on_behalf_of, their data subject
    "outbox_unavailable": 503,
    "controls_unavailable": 503,
    "forbidden": 403,
    "irreversible": 422,
    "audit_unavailable": 503,
}

# Refusals that may be an attack on tenant isolation: kept in the outbox's rejection table.
RECORDED = frozenset({"wrong_tenant", "wrong_actor", "idempotency_conflict"})


def http_status(error: KeelError) -> int:
    """The status code for ``error`` (500 only for codes no one mapped)."""
    return HTTP_STATUS.get(error.code, 500)


_FRAMEWORK = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
              415: "unsupported_media_type"}


def framework_error(status: int, detail: str) -> KeelError:
    """A refusal FastAPI or Starlette raised itself (a body that does not parse, an unknown path or
    method) as a typed error, so it answers ``{"error": {...}}`` like every other refusal."""
    code = _FRAMEWORK.get(status, "http_error")
    return KeelError(detail, code=code, field="body" if code == "malformed_json" else None)
