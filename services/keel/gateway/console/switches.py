"""Kill switches (list, engage, release, each with a reason) and the tenant's audit verify status.

A switch is a ``SetKillSwitch`` command to the tenant's controls aggregate; the processor
decides whether the person may throw it (policy roles) and publishes it on the controls
topic, which this gateway follows, so the page shows the switch once it is in force.
"""

from __future__ import annotations

import time
from typing import Any

from anyio import sleep, to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response

from keel.domain.governance.controls import Controls, TenantControls
from keel.domain.governance.pipeline import CONTROLS_AGGREGATE
from keel.domains.registry import current
from keel.errors import KeelError
from keel.gateway.console.changes import send, text
from keel.gateway.console.errors import BadInput, ConsoleError
from keel.gateway.console.guard import Change, Session, gateway
from keel.gateway.console.pages import PREFIX, ConsoleRoute, render
from keel.gateway.history import audit_status

SCOPES = {"agent": "an agent", "command_type": "a command type"}
FOLLOW_S = 5.0
"""How long a change waits for the gateway to read the switch back from the controls topic."""


class ControlsUnread(ConsoleError):
    """The gateway has not read the controls topic to its end yet (the broker is away)."""

    code = "controls_unavailable"
    status = 503


def _controls(request: Request) -> Controls:
    if not request.app.state.controls_read.is_set():
        raise ControlsUnread("the gateway has not read the current switches yet (is the broker up?); try again "
                             "shortly")
    return request.app.state.controls  # type: ignore[no-any-return]


def _switched(controls: TenantControls) -> list[tuple[str, str]]:
    return sorted([("agent", agent) for agent in controls.killed_agents]
                  + [("command_type", kind) for kind in controls.killed_command_types])


def _page(request: Request, tenant: str, status: int = 200, **context: Any) -> Response:
    types = sorted(cls.__name__ for domain in current().domains for cls in domain.commands)
    return render(request, "switches.html", status=status, switches=_switched(_controls(request).of(tenant)),
                  scopes=SCOPES, command_types=types, title="Kill switches", **context)


def switches_router() -> APIRouter:
    """``/console/switches`` and ``/console/audit``."""
    router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)

    @router.get("/switches")
    async def listed(request: Request, session: Session) -> Response:
        """The tenant's engaged switches, each with a release form, and the engage form."""
        return _page(request, session.principal.tenant_id)

    @router.post("/switches")
    async def change(request: Request, session: Change) -> Response:
        """Engage or release one switch, with a reason; answers the page as it is once the switch is in force."""
        form = await request.form()
        scope, engaged = form.get("scope"), form.get("engaged")
        if scope not in SCOPES or engaged not in ("true", "false"):
            raise BadInput("choose whether to switch an agent or a command type off or on. Nothing was changed.",
                           field="scope")
        target = text(form, "target", "agent or command type", required=True, limit=200)
        reason = text(form, "reason", "reason", required=True)
        on, tenant = engaged == "true", session.principal.tenant_id
        await send(gateway(request), session.principal, "SetKillSwitch", CONTROLS_AGGREGATE,
                   {"scope": scope, "target": target, "engaged": on, "reason": reason})
        deadline = time.monotonic() + FOLLOW_S
        while ((str(scope), target) in _switched(_controls(request).of(tenant))) != on \
                and time.monotonic() < deadline:
            await sleep(0.2)
        verb = "switched off" if on else "switched back on"
        return _page(request, tenant, notice=f"{SCOPES[str(scope)].capitalize()}, {target}, is {verb}.")

    @router.get("/audit")
    async def audit(request: Request, session: Session) -> Response:
        """The tenant's audit chain, verified now against its signed checkpoints."""
        try:
            status, unavailable = await to_thread.run_sync(audit_status, gateway(request), session.principal), None
        except KeelError as exc:
            status, unavailable = None, exc.message
        return render(request, "audit.html", status=200 if status else 503, audit=status, unavailable=unavailable,
                      title="Audit")

    return router
