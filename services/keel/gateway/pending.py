"""The approvals list's answer models, in a module of their own: ``keel.client`` reads them without
importing the gateway's routes (FastAPI, Kafka)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.domain.envelope import Actor, DelegationLink
from keel.domain.events import ApprovalKind


class PendingApproval(BaseModel):
    """A command parked until an approver approves it (or its subject confirms it), or it expires."""

    model_config = ConfigDict(frozen=True)

    command_id: uuid.UUID
    command_type: str
    aggregate_id: str
    actor: Actor
    on_behalf_of: str | None
    delegation: tuple[DelegationLink, ...]
    policy_rule: str = Field(description="The rule of the tenant's policy that asked for the decision.")
    policy_version: str
    approval_kind: ApprovalKind = Field(description="approval: by an approver role; confirmation: by the "
                                                    "on-behalf-of subject.")
    confidence: float | None = Field(description="The agent's own confidence, when its payload reports one.")
    payload: dict[str, Any] = Field(description="The parked command's payload; personal values read ⟨sealed⟩ "
                                                "unless the key has the personal_data role.")
    requested_at: str
    expires_at: datetime


class ApprovalList(BaseModel):
    """The caller's tenant's commands waiting for a decision, oldest request first."""

    model_config = ConfigDict(frozen=True)

    approvals: list[PendingApproval]
