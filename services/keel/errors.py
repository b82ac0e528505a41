"""Typed errors: every failure carries a machine-readable code and a human message.

Callers branch on ``code`` (stable, snake_case); people read ``message``. ``field`` names
the offending field path when one is to blame, so a client can point at it.
"""

from __future__ import annotations


class KeelError(Exception):
    """Base of every error Keel raises on purpose."""

    code: str = "keel_error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field

    def as_dict(self) -> dict[str, str | None]:
        """The error as a JSON-able mapping, for HTTP bodies and DLQ headers."""
        return {"code": self.code, "field": self.field, "message": self.message}

    def __str__(self) -> str:
        where = f" (field: {self.field})" if self.field else ""
        return f"[{self.code}] {self.message}{where}"


class ConfigError(KeelError):
    """The environment or settings are unusable."""

    code = "config_error"


class FileError(KeelError):
    """A file a person named cannot be used: missing, a directory, unreadable or unwritable, not text."""

    code = "file_error"


class InfraError(KeelError):
    """A local service (broker, database) is missing, will not start, or does not answer."""

    code = "infra_error"


class ValidationError(KeelError):
    """A message does not match its contract."""

    code = "schema_violation"


class UnknownMessageType(ValidationError):
    """The ``type`` names no command or event Keel knows."""

    code = "unknown_type"


class DecodeError(KeelError):
    """Bytes on a topic are not a Keel message (bad magic, unknown fingerprint, corrupt body)."""

    code = "undecodable"


class UnknownSchema(DecodeError):
    """The writer schema fingerprint is not in the catalog."""

    code = "unknown_schema"


class DeliveryError(KeelError):
    """Kafka did not acknowledge a produced message."""

    code = "delivery_failed"


class QueryError(KeelError):
    """An analyst query was refused or failed."""

    code = "query_error"


class AuthenticationFailed(KeelError):
    """The Kafka broker refused the configured principal's credentials (SASL)."""

    code = "kafka_authentication_failed"

    def __init__(self, message: str, *, principal: str, mechanism: str | None = None) -> None:
        super().__init__(message)
        self.principal = principal
        self.mechanism = mechanism


class AuthorizationDenied(KeelError):
    """The Kafka broker's ACLs deny the principal an operation on a resource (topic, group …)."""

    code = "kafka_authorization_denied"

    def __init__(self, message: str, *, principal: str, resource: str | None = None,
                 operation: str | None = None) -> None:
        super().__init__(message)
        self.principal = principal
        self.resource = resource
        self.operation = operation
