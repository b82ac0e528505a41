"""History and audit over HTTP: a command's timeline, a data subject's trail, the chain's verify status, undo.

Timelines and trails are read from the tenant's hash-chained audit (``keel.trust.show``
picks the records, exactly as ``keel audit show`` does), so what they say is what the
verified record says: who acted, on whose behalf, through which delegation, under which
authority, who approved, what the effects did and what undid it. The chainer follows the
processor closely, so the newest step may appear a moment after the command's status
shows it. Each read goes through the tenant's whole chain: fine for the chains of today,
an index for much longer ones is future work.

A subject's trail gathers everything done for one person, so it needs the ``auditor`` role;
a command's timeline and the verify status are open to any key of the tenant.
"""

# No ``from __future__ import annotations``: FastAPI evaluates the routes' annotations, which name
# the local ``Caller``.
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from anyio import to_thread
from confluent_kafka import KafkaException
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from keel.bootstrap import trust_settings
from keel.domain.principal import Principal
from keel.domains.registry import current
from keel.errors import ConfigError, KeelError
from keel.gateway.errors import NotFound
from keel.gateway.reading import read_as
from keel.gateway.schemas import KEYED, AcceptedResponse, error_responses
from keel.gateway.submit import Gateway, submit_as
from keel.ops.undo import compensation_of
from keel.trust.checkpoints import TrustedKeys
from keel.trust.record import AuditRecord
from keel.trust.reveal import Reader
from keel.trust.show import payload_of, references, select_trail
from keel.trust.store import TenantAudit, read_audit
from keel.trust.verify import verify_chain

AUDITOR_ROLE = "auditor"
"""The role of a key that may read a data subject's whole trail."""


class TrailEntry(BaseModel):
    """One record of the tenant's audit chain."""

    model_config = ConfigDict(frozen=True)

    seq: int = Field(description="Its position in the tenant's chain.")
    occurred_at: datetime | None
    kind: str = Field(description="event (decided by the processor) or receipt (erasure, a personal data "
                                  "read, an isolation violation...).")
    type: str
    aggregate_id: str | None
    version: int | None
    actor: str | None = Field(description="kind:id of who acted.")
    on_behalf_of: str | None
    delegation: list[dict[str, Any]] = Field(description="The chain of delegation, each link an actor "
                                                         "and its reason.")
    authority: dict[str, Any] = Field(description="Role, grant, policy rule and version, approval id.")
    caused_by: str | None = Field(description="The command that caused it.")
    names: dict[str, str] = Field(description="Command ids its payload names: the command an approval "
                                              "decided, the one a compensation reversed...")
    undoes: bool = Field(description="A compensation or an erasure: it undoes earlier steps.")
    payload: dict[str, Any] = Field(description="Personal values read ⟨sealed⟩ unless the key has the "
                                                "personal_data role.")


class Trail(BaseModel):
    """The records of one story, in chain order."""

    model_config = ConfigDict(frozen=True)

    entries: list[TrailEntry]


class Checkpointed(BaseModel):
    """The latest signed checkpoint: the head the chainer vouched for, and when."""

    model_config = ConfigDict(frozen=True)

    seq: int
    hash: str
    key_id: str
    signed_at: datetime


class AuditFailure(BaseModel):
    """The first bad record: where, and what is wrong with it."""

    model_config = ConfigDict(frozen=True)

    seq: int
    kind: str
    detail: str


class AuditStatus(BaseModel):
    """The tenant's chain, recomputed now and checked against every signed checkpoint."""

    model_config = ConfigDict(frozen=True)

    verdict: Literal["ok", "failed", "empty"] = Field(description="ok: intact; failed: see failure; "
                                                                  "empty: no records, nothing verified.")
    summary: str = Field(description="What `keel audit verify` prints.")
    records: int
    checkpoints: int
    head: str = Field(description="The hash of the last record, hex.")
    failure: AuditFailure | None
    latest_checkpoint: Checkpointed | None


class UndoBody(BaseModel):
    """Undo an executed command with its domain's compensation."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=1000)
    id: uuid.UUID | None = Field(default=None, description="The compensation's command id; send one to be "
                                                           "idempotent.")


class AuditUnavailable(KeelError):
    """The audit chain cannot be read now (the broker is away) or verified (no trusted keys configured)."""

    code = "audit_unavailable"


class Forbidden(KeelError):
    """The key lacks the role the route needs."""

    code = "forbidden"


def command_timeline(gw: Gateway, caller: Principal, command_id: uuid.UUID) -> Trail:
    """``command_id``'s story (decision, approvals, effects, undo) as ``caller`` may read it; blocking.

    404 when the tenant neither knows the command nor has a record of it.
    """
    records = select_trail(_audit(gw, caller).records, command=str(command_id))
    if not records and gw.store.get(caller.tenant_id, command_id) is None:
        raise NotFound(f"no command {command_id} in tenant {caller.tenant_id}", field="path.command_id")
    return _trail(gw, caller, records, via=f"GET /v1/commands/{command_id}/timeline")


def subject_trail(gw: Gateway, caller: Principal, subject: str) -> Trail:
    """Everything done on behalf of ``subject``, with its approvals and compensations; blocking."""
    if AUDITOR_ROLE not in caller.roles:
        raise Forbidden(f"the key of {caller.actor.id} lacks the {AUDITOR_ROLE} role", field="")
    records = select_trail(_audit(gw, caller).records, subject=subject)
    return _trail(gw, caller, records, via="GET /v1/subjects/{subject}/trail")


def audit_status(gw: Gateway, caller: Principal) -> AuditStatus:
    """``caller``'s tenant's chain verified now against its authentic checkpoints; blocking."""
    audit = _audit(gw, caller)
    try:
        trusted = TrustedKeys.from_settings(trust_settings(gw.settings))
    except ConfigError as exc:
        raise AuditUnavailable(f"the audit chain cannot be verified here: {exc.message}", field="") from None
    report = verify_chain(caller.tenant_id, audit.records, audit.checkpoints, trusted)
    latest = max(audit.checkpoints, key=lambda c: c.seq, default=None)
    failure = report.failure
    return AuditStatus(
        verdict="failed" if failure else "ok" if report.ok else "empty", summary=report.summary(),
        records=report.records, checkpoints=report.checkpoints, head=report.head.hex(),
        failure=AuditFailure(seq=failure.seq, kind=failure.kind.value, detail=failure.detail) if failure else None,
        latest_checkpoint=None if latest is None else Checkpointed(
            seq=latest.seq, hash=latest.head.hex(), key_id=latest.key_id,
            signed_at=datetime.fromtimestamp(latest.signed_at_us / 1e6, UTC)))


async def undo(gw: Gateway, caller: Principal, command_id: uuid.UUID, reason: str,
               undo_id: uuid.UUID | None = None) -> bytes:
    """Send the compensation of ``command_id`` as ``caller``, through ``submit_as`` (the processor decides
    whether the caller may); returns the 202 body."""
    try:
        undoing = await to_thread.run_sync(compensation_of, gw.settings, caller.tenant_id, command_id, reason)
    except KeelError as exc:
        if exc.code == "command_not_found":
            raise NotFound(exc.message, field="path.command_id") from None
        raise
    except KafkaException as exc:
        raise AuditUnavailable(f"the events topic cannot be read now: {exc}", field="") from None
    document: dict[str, Any] = {
        "type": type(undoing.payload).__name__, "aggregate_id": undoing.aggregate_id,
        "payload": undoing.payload.model_dump(mode="json"), "causation_id": str(undoing.causation_id),
        "correlation_id": str(undoing.correlation_id)}
    if undo_id is not None:
        document["id"] = str(undo_id)
    return await submit_as(gw, caller, orjson.dumps(document))


def _audit(gw: Gateway, caller: Principal) -> TenantAudit:
    try:
        return read_audit(gw.settings, caller.tenant_id)
    except (KafkaException, KeelError) as exc:
        raise AuditUnavailable(f"the audit chain cannot be read now: {exc}", field="") from None


def _trail(gw: Gateway, caller: Principal, records: list[AuditRecord], *, via: str) -> Trail:
    return read_as(gw, caller, lambda reader: Trail(entries=[_entry(r, reader) for r in records]), via=via)


def _entry(record: AuditRecord, reader: Reader) -> TrailEntry:
    e = record.entry
    event = e.kind == "event"
    payload = reader.payload(payload_of(e), message_type=e.type if event else None, tenant=e.tenant,
                             subject=e.on_behalf_of, entry_id=e.entry_id, command_id=e.causation_id or e.entry_id)
    named = references(e)
    return TrailEntry(
        seq=record.seq, kind=e.kind, type=e.type, aggregate_id=e.aggregate_id, version=e.version, actor=e.actor,
        occurred_at=None if e.occurred_at_us is None else datetime.fromtimestamp(e.occurred_at_us / 1e6, UTC),
        on_behalf_of=e.on_behalf_of, delegation=orjson.loads(e.delegation or "[]"),
        authority={k: v for k, v in orjson.loads(e.authority or "{}").items() if v}, caused_by=e.causation_id,
        names={name: str(value) for name, value in payload.items() if str(value) in named},
        undoes=e.type == "SubjectErased" or e.type in current().compensating, payload=payload)


def history_router(principal: Callable[..., Awaitable[Principal]]) -> APIRouter:
    """The routes, authenticating with the gateway's ``principal`` dependency."""
    router = APIRouter(tags=["history"])
    Caller = Annotated[Principal, Depends(principal)]
    read = error_responses(*KEYED, "not_found", "schema_violation", "audit_unavailable")

    @router.get("/v1/commands/{command_id}/timeline", response_model=Trail, responses=read)
    async def timeline(command_id: uuid.UUID, request: Request, caller: Caller) -> Trail:
        """The command's story from the tenant's audit chain: its decision, approvals, events, effect
        outcomes and the compensation that undid it, each with who, on whose behalf and under what authority."""
        return await to_thread.run_sync(command_timeline, _gateway(request), caller, command_id)

    @router.get("/v1/subjects/{subject}/trail", response_model=Trail,
                responses=error_responses(*KEYED, "forbidden", "schema_violation", "audit_unavailable"))
    async def trail(subject: Annotated[str, Path(min_length=1, max_length=200)], request: Request,
                    caller: Caller) -> Trail:
        """Everything done on behalf of a data subject (an on-behalf-of id), with the approvals and
        compensations of those commands. Needs the auditor role."""
        return await to_thread.run_sync(subject_trail, _gateway(request), caller, subject)

    @router.get("/v1/audit/status", response_model=AuditStatus,
                responses=error_responses(*KEYED, "audit_unavailable"))
    async def status(request: Request, caller: Caller) -> AuditStatus:
        """The tenant's audit chain recomputed now and checked against its signed checkpoints: intact or
        the first bad record, with the latest checkpoint."""
        return await to_thread.run_sync(audit_status, _gateway(request), caller)

    @router.post("/v1/commands/{command_id}/undo", status_code=202, response_model=AcceptedResponse,
                 responses=error_responses(*KEYED, "malformed_json", "not_found", "irreversible", "schema_violation",
                                           "idempotency_conflict", "audit_unavailable"))
    async def undo_route(command_id: uuid.UUID, body: UndoBody, request: Request, caller: Caller) -> Response:
        """Undo an executed command with the compensation its domain declares; 202 with the compensation's
        own id, whose record tells what the processor decided (the policy governs undo like any command)."""
        accepted = await undo(_gateway(request), caller, command_id, body.reason, body.id)
        return Response(accepted, status_code=202, media_type="application/json")

    return router


def _gateway(request: Request) -> Gateway:
    return request.app.state["gateway"]  # type: ignore[no-any-return]
