"""``/v1/approvals``: what waits in the caller's tenant for an approval or a confirmation, and deciding it.

A decision is an ``ApproveCommand`` or ``RejectCommand`` to the parked command's aggregate,
sent through ``submit`` exactly as ``POST /v1/commands`` would take it (same checks,
idempotency, outbox and refusal records); the processor decides whether the caller may
decide (``not_pending``, ``self_approval``, ``not_an_approver``…), which
``GET /v1/commands/{id}`` of the answered id then tells.

The list shows each parked payload as its reader may (``keel.gateway.reading``): personal
values ``⟨sealed⟩``, or in plaintext to a key with the ``personal_data`` role, each such read
recorded in the tenant's audit chain; and, on its own, the agent's numeric ``confidence``.
"""

# No ``from __future__ import annotations``: FastAPI evaluates the routes' annotations, which name
# the local ``Caller``.
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from keel.domain.envelope import Actor, DelegationLink
from keel.domain.events import ApprovalRequested
from keel.domain.principal import Principal
from keel.gateway.errors import NotFound
from keel.gateway.pending import ApprovalList, PendingApproval
from keel.gateway.schemas import KEYED, AcceptedResponse, error_responses
from keel.gateway.reading import read_as
from keel.gateway.submit import Gateway, submit_as
from keel.outbox.models import CommandRecord
from keel.trust.reveal import Reader

PATH = "/v1/approvals"
_ID = Field(default=None, description="The decision's command id; send one to be idempotent.")


class ApproveBody(BaseModel):
    """Approve (or confirm) a parked command."""

    model_config = ConfigDict(extra="forbid")

    comment: str | None = Field(default=None, max_length=1000)
    id: uuid.UUID | None = _ID


class RejectBody(BaseModel):
    """Reject a parked command, saying why."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=1000)
    id: uuid.UUID | None = _ID


class _Parked(BaseModel):
    """The parts of the parked envelope the list shows (its payload may be sealed: read as raw JSON)."""

    aggregate_id: str
    actor: Actor
    on_behalf_of: str | None = None
    delegation: tuple[DelegationLink, ...] = ()
    payload: dict[str, Any] = {}


def requested(record: CommandRecord, reader: Reader | None = None) -> PendingApproval | None:
    """``record``'s request for a decision as ``reader`` sees it (default: personal values marked);
    None when it never asked for one."""
    event = next((e for e in record.events if e.type == "ApprovalRequested"), None)
    if event is None:
        return None
    asked = ApprovalRequested.model_validate(event.payload)
    parked = _Parked.model_validate_json(asked.command)
    confidence = parked.payload.get("confidence")
    payload = (reader or Reader(None)).payload(
        parked.payload, message_type=record.command_type, tenant=record.tenant_id, subject=parked.on_behalf_of,
        entry_id=str(record.command_id), command_id=str(record.command_id))
    return PendingApproval(
        command_id=record.command_id, command_type=record.command_type, aggregate_id=parked.aggregate_id,
        actor=parked.actor, on_behalf_of=parked.on_behalf_of, delegation=parked.delegation,
        policy_rule=asked.policy_rule, policy_version=asked.policy_version, approval_kind=asked.approval_kind,
        confidence=float(confidence) if isinstance(confidence, int | float) else None,
        requested_at=event.occurred_at, expires_at=asked.expires_at, payload=payload)


def pending(gw: Gateway, caller: Principal, limit: int = 100) -> list[PendingApproval]:
    """What waits in ``caller``'s tenant for a decision, payloads as ``caller`` may read them; blocking."""
    records = gw.store.pending_approvals(caller.tenant_id, limit)
    return read_as(gw, caller, lambda reader: [shown for record in records
                                               if (shown := requested(record, reader)) is not None], via=f"GET {PATH}")


def approvals_router(principal: Callable[..., Awaitable[Principal]]) -> APIRouter:
    """The routes, authenticating with the gateway's ``principal`` dependency."""
    router = APIRouter(prefix=PATH, tags=["approvals"])
    Caller = Annotated[Principal, Depends(principal)]
    refusals = error_responses(*KEYED, "malformed_json", "not_found", "schema_violation", "idempotency_conflict")
    decided: dict[str, Any] = {"status_code": 202, "response_model": AcceptedResponse, "responses": refusals}

    @router.get("", response_model=ApprovalList, responses=error_responses(*KEYED, "schema_violation"))
    async def listed(request: Request, caller: Caller,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ApprovalList:
        """The commands of the key's tenant waiting for an approval or a confirmation, oldest first; personal
        values read ⟨sealed⟩ unless the key has the personal_data role (each such read is audited)."""
        return ApprovalList(approvals=await to_thread.run_sync(pending, _gateway(request), caller, limit))

    @router.post("/{command_id}/approve", **decided)
    async def approve(command_id: uuid.UUID, body: ApproveBody, request: Request, caller: Caller) -> Response:
        """Approve (or, as its subject, confirm) the parked command; 202 with the approval's own id,
        whose record tells what the processor decided."""
        return await _decide(request, caller, command_id, "ApproveCommand", {"comment": body.comment}, body.id)

    @router.post("/{command_id}/reject", **decided)
    async def reject(command_id: uuid.UUID, body: RejectBody, request: Request, caller: Caller) -> Response:
        """Reject the parked command; 202 with the rejection's own id, whose record tells what the
        processor decided."""
        return await _decide(request, caller, command_id, "RejectCommand", {"reason": body.reason}, body.id)

    return router


def _gateway(request: Request) -> Gateway:
    return request.app.state["gateway"]  # type: ignore[no-any-return]


async def _decide(request: Request, caller: Principal, command_id: uuid.UUID, decision: str,
                  fields: dict[str, Any], decision_id: uuid.UUID | None) -> Response:
    """Send ``decision`` on the tenant's parked ``command_id`` through ``submit``.

    404 unless the command ever waited for a decision; whether it still waits is the
    processor's to say (``not_pending``): the status store may lag it.
    """
    gw = _gateway(request)
    record = await to_thread.run_sync(gw.store.get, caller.tenant_id, command_id)
    parked = requested(record) if record is not None else None
    if parked is None:  # another tenant's id reads as unknown: no leak
        raise NotFound(f"no command {command_id} of tenant {caller.tenant_id} asked for a decision",
                       field="path.command_id")
    document = {"type": decision, "aggregate_id": parked.aggregate_id,
                "payload": {"command_id": str(command_id), **fields}}
    if decision_id is not None:
        document["id"] = str(decision_id)
    return Response(await submit_as(gw, caller, orjson.dumps(document)), status_code=202,
                    media_type="application/json")
