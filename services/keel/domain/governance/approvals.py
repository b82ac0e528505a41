"""Commands parked for approval, folded from an aggregate's events.

A parked command lives in the events (``ApprovalRequested`` carries the whole command),
so it survives restarts and rebalances: whichever worker owns the partition rebuilds the
same pending set. Granted, rejected or expired approvals leave it; nothing runs twice.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from keel.domain.envelope import Envelope
from keel.domain.parsing import parse_envelope
from keel.domain.events import ApprovalExpired, ApprovalGranted, ApprovalKind, ApprovalRejected, ApprovalRequested


_SETTLING = frozenset({ApprovalGranted, ApprovalRejected, ApprovalExpired})


@dataclass(frozen=True)
class Parked:
    """A command waiting for approval or confirmation."""

    command: Envelope
    kind: ApprovalKind
    policy_rule: str
    policy_version: str
    expires_at: datetime


def fold_pending(pending: dict[uuid.UUID, Parked], event: Envelope) -> dict[uuid.UUID, Parked]:
    """The pending approvals after ``event`` (a new dict when it changes)."""
    kind = type(event.payload)  # most events touch no approval: one look-up, not four class checks
    if kind is not ApprovalRequested and (not pending or kind not in _SETTLING):
        return pending
    match event.payload:
        case ApprovalRequested() as requested:
            command = parse_envelope(json.loads(requested.command))
            return {**pending, requested.command_id: Parked(
                command, requested.approval_kind, requested.policy_rule, requested.policy_version,
                requested.expires_at)}
        case ApprovalGranted() | ApprovalRejected() | ApprovalExpired() as done if done.command_id in pending:
            return {k: v for k, v in pending.items() if k != done.command_id}
    return pending
