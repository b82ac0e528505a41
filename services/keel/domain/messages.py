"""Every message type this process knows, by name: Keel's own and the registered domains'.

The envelope's ``type`` selects the payload class from here; every class has a schema
(``schemas/`` for Keel's own, the domain's ``schemas/`` for a team's).
"""

from __future__ import annotations

import inspect

from keel.domain import commands, events
from keel.domain.commands import (
    ApproveCommand,
    ExpireApproval,
    RejectCommand,
    ResetBreaker,
    SetKillSwitch,
    SetPolicy,
    SwitchScope,
    TripBreaker,
)
from keel.domain.envelope import Payload
from keel.domain.events import (
    ApprovalExpired,
    ApprovalGranted,
    ApprovalKind,
    ApprovalRejected,
    ApprovalRequested,
    BreakerReset,
    BreakerTripped,
    CommandRejected,
    KillSwitchEngaged,
    KillSwitchReleased,
    PolicyPublished,
)
from keel.domain.payloads import Command, Event
from keel.errors import UnknownMessageType

CORE_PAYLOADS: dict[str, type[Payload]] = {
    name: cls
    for module in (commands, events)
    for name, cls in inspect.getmembers(module, inspect.isclass)
    if cls.__module__ == module.__name__ and issubclass(cls, (Command, Event))
}
_known: dict[str, type[Payload]] = {}


def known_payloads() -> dict[str, type[Payload]]:
    """Keel's payload classes and every registered domain's, by type name (loaded once)."""
    if not _known:
        from keel.domains.registry import current

        _known.update({**CORE_PAYLOADS, **current().payloads})
    return _known


def payload_class(message_type: str) -> type[Payload]:
    """The payload class registered for ``message_type``."""
    try:
        return (_known or known_payloads())[message_type]
    except KeyError:
        raise UnknownMessageType(
            f"unknown message type {message_type!r}; known: {', '.join(sorted(known_payloads()))}",
            field="type",
        ) from None


__all__ = [
    "CORE_PAYLOADS", "known_payloads", "payload_class", "Command", "Event",
    "ApproveCommand", "ExpireApproval", "RejectCommand", "ResetBreaker", "SetKillSwitch", "SetPolicy",
    "SwitchScope", "TripBreaker",
    "ApprovalExpired", "ApprovalGranted", "ApprovalKind", "ApprovalRejected", "ApprovalRequested",
    "BreakerReset", "BreakerTripped", "CommandRejected", "KillSwitchEngaged", "KillSwitchReleased",
    "PolicyPublished",
]
