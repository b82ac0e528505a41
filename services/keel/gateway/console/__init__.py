"""The web console at ``/console``: where approvers and auditors meet Keel.

Server-rendered (Jinja2) pages with htmx (vendored under ``static/``, no build step, no
SPA): sign-in with a person's API key into a server-side session, the approvals inbox kept
live over SSE, a command's timeline and undo, kill switches and the audit verify status.
Every change is a command sent through ``submit_as``, so the processor governs it exactly
as it governs an agent's. See ``docs/console.md``.
"""

from __future__ import annotations

from fastapi import APIRouter

from keel.gateway.console.commands import commands_router
from keel.gateway.console.inbox import inbox_router
from keel.gateway.console.signin import sign_in_router
from keel.gateway.console.static import static_router
from keel.gateway.console.switches import switches_router


def console_router() -> APIRouter:
    """Every console route, to include in the gateway app."""
    router = APIRouter()
    for part in (static_router(), sign_in_router(), inbox_router(), commands_router(), switches_router()):
        router.include_router(part)
    return router
