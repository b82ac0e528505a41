"""A command's page: its status, events and effects as the outbox tracks them (refreshed until
they settle), its story from the tenant's audit chain (decision, approvals, effect outcomes,
undo) and the undo form.

The live part shows no payloads, so polling it records no personal data reads; payloads are
read once per page, through ``keel.gateway.reading`` like every other read.
"""

from __future__ import annotations

import uuid

import orjson
from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response

from keel.errors import KeelError
from keel.gateway.console.changes import command_id, refusal_text, settle, text
from keel.gateway.console.errors import NotFoundHere, Refused
from keel.gateway.console.guard import Change, Session, gateway
from keel.gateway.console.pages import PREFIX, ConsoleRoute, is_htmx, render
from keel.gateway.console.sessions import ConsoleSession
from keel.gateway.history import Trail, command_timeline, undo
from keel.gateway.reading import read_as
from keel.gateway.submit import Gateway
from keel.outbox.models import CommandRecord, CommandStatus


async def _record(gw: Gateway, session: ConsoleSession, wanted: uuid.UUID) -> CommandRecord:
    found = await to_thread.run_sync(gw.store.get, session.principal.tenant_id, wanted)
    if found is None:  # another tenant's id reads as unknown
        raise NotFoundHere(f"no command {wanted} in your tenant")
    return found


def _story(gw: Gateway, session: ConsoleSession, wanted: uuid.UUID) -> tuple[Trail | None, str | None]:
    """The audit chain's timeline, or why it cannot be shown now (the page still shows the record)."""
    try:
        return command_timeline(gw, session.principal, wanted), None
    except KeelError as exc:
        return None, exc.message


def _reason(gw: Gateway, session: ConsoleSession, record: CommandRecord) -> str | None:
    """The record's reason with personal values as the reader may see them."""
    shown = read_as(gw, session.principal, lambda reader: reader.masked(record.reason),
                    via=f"GET {PREFIX}/commands/{record.command_id}")
    return None if shown is None else str(shown)


def commands_router() -> APIRouter:
    """``/console/commands/{id}``, its live part, and undo."""
    router = APIRouter(prefix=f"{PREFIX}/commands", route_class=ConsoleRoute, include_in_schema=False)

    @router.get("/{raw_id}")
    async def page(request: Request, raw_id: str, session: Session) -> Response:
        """The command's page."""
        gw, wanted = gateway(request), command_id(raw_id)
        record = await _record(gw, session, wanted)
        trail, unavailable = await to_thread.run_sync(_story, gw, session, wanted)
        reason = await to_thread.run_sync(_reason, gw, session, record)
        return render(request, "command.html", record=record, reason=reason, trail=trail, unavailable=unavailable,
                      title=f"{record.command_type} {wanted}")

    @router.get("/{raw_id}/live")
    async def live(request: Request, raw_id: str, session: Session) -> Response:
        """Status, events and effects (no payloads); htmx polls it until the command is done."""
        record = await _record(gateway(request), session, command_id(raw_id))
        return render(request, "_live.html", record=record)

    @router.post("/{raw_id}/undo")
    async def undo_route(request: Request, raw_id: str, session: Change) -> Response:
        """Send the command's compensation, as its domain declares it, and show what the processor decided."""
        gw, wanted = gateway(request), command_id(raw_id)
        reason = text(await request.form(), "reason", "reason", required=True)
        assert reason is not None
        record = await _record(gw, session, wanted)
        if record.status is not CommandStatus.EXECUTED:
            raise Refused(f"Nothing changed: only an executed command can be undone; this one is {record.status}.",
                          code="not_executed")
        answer = orjson.loads(await undo(gw, session.principal, wanted, reason))
        sent = await settle(gw, session.principal.tenant_id, uuid.UUID(answer["command_id"]))
        if sent.record is not None and sent.decided and sent.record.status is not CommandStatus.EXECUTED:
            raise Refused(refusal_text(sent.record), code=sent.record.reason_code or "refused")
        template = "_undone.html" if is_htmx(request) else "undone.html"
        return render(request, template, status=200 if sent.decided else 202, sent=sent, record=record,
                      title="Undo")

    return router
