"""The registry of every message type Keel knows, by name.

The envelope's ``type`` selects the payload class from here; every class has a schema
under ``schemas/`` (a unit test proves the two agree).
"""

from __future__ import annotations

import inspect

from keel.domain import commands, events
from keel.domain.commands import (
    ApproveCommand,
    CancelSubscription,
    ExpireApproval,
    IssueRefund,
    ReactivateSubscription,
    RejectCommand,
    ResetBreaker,
    ReverseRefund,
    SendEmail,
    SetKillSwitch,
    SetPolicy,
    StartSubscription,
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
    EmailQueued,
    KillSwitchEngaged,
    KillSwitchReleased,
    PolicyPublished,
    RefundIssued,
    RefundReversed,
    SubscriptionCancelled,
    SubscriptionReactivated,
    SubscriptionStarted,
)
from keel.domain.payloads import Command, Event
from keel.errors import UnknownMessageType

PAYLOADS: dict[str, type[Payload]] = {
    name: cls
    for module in (commands, events)
    for name, cls in inspect.getmembers(module, inspect.isclass)
    if cls.__module__ == module.__name__ and issubclass(cls, (Command, Event))
}


def payload_class(message_type: str) -> type[Payload]:
    """The payload class registered for ``message_type``."""
    try:
        return PAYLOADS[message_type]
    except KeyError:
        raise UnknownMessageType(
            f"unknown message type {message_type!r}; known: {', '.join(sorted(PAYLOADS))}",
            field="type",
        ) from None


__all__ = [
    "PAYLOADS", "payload_class", "Command", "Event",
    "ApproveCommand", "CancelSubscription", "ExpireApproval", "IssueRefund", "ReactivateSubscription",
    "RejectCommand", "ResetBreaker", "ReverseRefund", "SendEmail", "SetKillSwitch", "SetPolicy",
    "StartSubscription", "SwitchScope", "TripBreaker",
    "ApprovalExpired", "ApprovalGranted", "ApprovalKind", "ApprovalRejected", "ApprovalRequested",
    "BreakerReset", "BreakerTripped", "CommandRejected", "EmailQueued", "KillSwitchEngaged",
    "KillSwitchReleased", "PolicyPublished", "RefundIssued", "RefundReversed", "SubscriptionCancelled",
    "SubscriptionReactivated", "SubscriptionStarted",
]
