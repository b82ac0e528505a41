"""The approvals inbox: what waits in the tenant for a decision, with everything needed to decide
it, kept live over SSE, and the approve and reject buttons.

A decision goes to the parked command's aggregate as ``ApproveCommand`` / ``RejectCommand``
(as ``/v1/approvals`` sends it); an id that never asked for a decision in the caller's
tenant, another tenant's included, is answered 404 like an unknown one, and nothing is sent.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator

from anyio import sleep, to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from keel.gateway.approvals import pending, requested
from keel.gateway.console.changes import Sent, command_id, send, text
from keel.gateway.console.errors import NotFoundHere
from keel.gateway.console.guard import Change, Session, gateway, sessions
from keel.gateway.console.pages import PREFIX, SESSION_COOKIE, ConsoleRoute, fragment, is_htmx, render
from keel.gateway.console.sessions import ConsoleSession
from keel.gateway.pending import PendingApproval
from keel.gateway.submit import Gateway

LIMIT = 200
"""The most requests the inbox shows at once, oldest first."""
POLL_S = 1.0
STREAM_S = 60.0
"""An SSE stream ends after this long, so a stopping gateway never waits long for it; the browser
reconnects at once with the id of the list it shows (``Last-Event-ID``), which is sent again only if
it changed. A revoked key or an ended session stops the stream sooner."""


async def _items(gw: Gateway, session: ConsoleSession) -> list[PendingApproval]:
    return await to_thread.run_sync(pending, gw, session.principal, LIMIT)


def inbox_router() -> APIRouter:
    """``/console`` (the inbox), its fragment and SSE stream, and the decisions."""
    router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)

    @router.get("")
    async def inbox(request: Request, session: Session) -> Response:
        """The inbox page."""
        return render(request, "inbox.html", items=await _items(gateway(request), session), title="Approvals")

    @router.get("/inbox")
    async def listed(request: Request, session: Session) -> Response:
        """The list alone, as the SSE stream sends it."""
        return render(request, "_approvals.html", items=await _items(gateway(request), session))

    @router.get("/inbox/events", response_class=EventSourceResponse)
    async def events(request: Request, session: Session) -> AsyncIterator[ServerSentEvent]:
        """``approvals`` events carrying the re-rendered list, on connect and whenever the set of
        waiting requests changes (payloads are read, and personal reads audited, only then)."""
        gw, seen = gateway(request), request.headers.get("last-event-id")  # a reconnect says what it has
        started = checked = time.monotonic()
        while time.monotonic() - started < STREAM_S:  # a client that goes away cancels the stream
            if time.monotonic() - checked > 10:  # sign-out and key revocation end the stream too
                checked = time.monotonic()
                if await to_thread.run_sync(sessions(request).find, request.cookies.get(SESSION_COOKIE)) is None:
                    return
            records = await to_thread.run_sync(gw.store.pending_approvals, session.principal.tenant_id, LIMIT)
            mark = hashlib.sha256(b"".join(record.command_id.bytes for record in records)).hexdigest()[:16]
            if mark != seen:
                seen = mark
                shown = fragment("_approvals.html", session, items=await _items(gw, session))
                yield ServerSentEvent(event="approvals", id=mark, retry=1000, raw_data=shown)
            await sleep(POLL_S)

    @router.post("/approvals/{raw_id}/approve")
    async def approve(request: Request, raw_id: str, session: Change) -> Response:
        """Approve (or, as its subject, confirm) a parked command, with an optional comment."""
        comment = text(await request.form(), "comment", "comment", required=False)
        return await _decide(request, session, command_id(raw_id), "ApproveCommand", {"comment": comment})

    @router.post("/approvals/{raw_id}/reject")
    async def reject(request: Request, raw_id: str, session: Change) -> Response:
        """Reject a parked command; the comment is the reason, and it is required."""
        reason = text(await request.form(), "comment", "comment", required=True)
        return await _decide(request, session, command_id(raw_id), "RejectCommand", {"reason": reason})

    return router


async def _decide(request: Request, session: ConsoleSession, parked_id: uuid.UUID, decision: str,
                  fields: dict[str, str | None]) -> Response:
    gw, caller = gateway(request), session.principal
    record = await to_thread.run_sync(gw.store.get, caller.tenant_id, parked_id)
    parked = requested(record) if record is not None else None
    if parked is None:  # another tenant's id reads as unknown: nothing leaks, nothing is sent
        raise NotFoundHere(f"no request for a decision {parked_id} in your tenant")
    sent: Sent = await send(gw, caller, decision, parked.aggregate_id, {"command_id": str(parked_id), **fields})
    template = "_decided.html" if is_htmx(request) else "decided.html"
    return render(request, template, status=200 if sent.decided else 202, sent=sent, parked=parked,
                  approved=decision == "ApproveCommand", title="Decision")
