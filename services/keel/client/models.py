"""The gateway's answers as typed models, taken from the server's own modules where that is cheap.

Every answer is parsed with the very model the gateway serialises (``keel.gateway.actions``,
``keel.gateway.pending``, ``keel.gateway.schemas``, ``keel.outbox.models``), none of which
imports the web framework or Kafka.
"""

from __future__ import annotations

from keel.domain.events import ApprovalKind
from keel.effects.progress import EffectState, WaitReason
from keel.gateway.actions import Action, ActionList, Explanation
from keel.gateway.pending import ApprovalList, PendingApproval
from keel.gateway.schemas import AcceptedResponse, ErrorDetail
from keel.outbox.models import CommandRecord, CommandStatus, Summary, TrackedEvent

__all__ = ["AcceptedResponse", "Action", "ActionList", "ApprovalKind", "ApprovalList", "CommandRecord",
           "CommandStatus", "EffectState", "ErrorDetail", "Explanation", "PendingApproval", "Summary",
           "TrackedEvent", "WaitReason"]
