"""What the client raises: the gateway's refusals, and waits that cannot end as asked.

Each is a ``KeelError``, so callers branch on ``code`` as they do on the gateway's own errors.
"""

from __future__ import annotations

from keel.errors import KeelError
from keel.gateway.schemas import ErrorDetail
from keel.outbox.models import CommandRecord


class RequestRefused(KeelError):
    """The gateway refused a request. ``error`` is its ``{"code", "field", "message"}`` body
    (``code``, ``field`` and ``message`` repeat it); ``status`` is the HTTP status and
    ``request`` names the method and path."""

    code = "request_refused"

    def __init__(self, message: str, *, code: str | None, field: str | None, status: int,
                 request: str = "") -> None:
        super().__init__(message, code=code, field=field)
        self.status, self.request = status, request
        self.error = ErrorDetail(code=self.code, field=field, message=message)

    def __str__(self) -> str:
        said = super().__str__()
        return f"{said} ({self.request} answered {self.status})" if self.request else said


class EndedOtherwise(KeelError):
    """The command or its effects reached a final state other than the one waited for."""

    code = "ended_otherwise"

    def __init__(self, message: str, record: CommandRecord) -> None:
        super().__init__(message)
        self.record = record


class WaitTimedOut(KeelError):
    """The state waited for was not reached in time; ``record`` is the last one seen."""

    code = "wait_timeout"

    def __init__(self, message: str, record: CommandRecord | None) -> None:
        super().__init__(message)
        self.record = record
