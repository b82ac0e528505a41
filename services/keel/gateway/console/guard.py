"""Who is signed in, and whether a change carries the session's CSRF token.

Every page depends on ``signed_in``; every POST on ``changing``, which checks the
synchronizer token (the hidden ``csrf_token`` form field, or the ``X-CSRF-Token`` header
htmx sends from ``hx-headers``) before anything is read or sent. A cross-site page cannot
read the token, so it cannot forge a change even if a browser sent the cookie along.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from anyio import to_thread
from fastapi import Depends, Request

from keel.gateway.console.errors import CsrfRefused, SignInRequired
from keel.gateway.console.pages import SESSION_COOKIE
from keel.gateway.console.sessions import ConsoleSession, SessionStore
from keel.gateway.submit import Gateway

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def gateway(request: Request) -> Gateway:
    """The gateway's shared state."""
    return request.app.state["gateway"]  # type: ignore[no-any-return]


def sessions(request: Request) -> SessionStore:
    """The app's session store, made on first use (the gateway's start-up is not the console's to change)."""
    store: SessionStore | None = getattr(request.app.state, "console_sessions", None)
    if store is None:
        store = SessionStore(gateway(request).store.db)
        request.app.state.console_sessions = store
    return store


async def signed_in(request: Request) -> ConsoleSession:
    """The request's live session, or ``SignInRequired``."""
    token = request.cookies.get(SESSION_COOKIE)
    found = await to_thread.run_sync(sessions(request).find, token) if token else None
    if found is None:
        raise SignInRequired("your session has ended or is not valid: sign in again with your key"
                             if token else "sign in with your key first")
    request.state.console_session = found
    return found


async def changing(request: Request, session: Annotated[ConsoleSession, Depends(signed_in)]) -> ConsoleSession:
    """The session of a change that carries its CSRF token, or ``CsrfRefused`` (nothing is changed)."""
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and "form" in request.headers.get("content-type", ""):
        value = (await request.form()).get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not sent or not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
        raise CsrfRefused("this change came without the page's security token (CSRF), so nothing was changed; "
                          "reload the page and try again")
    return session


Session = Annotated[ConsoleSession, Depends(signed_in)]
Change = Annotated[ConsoleSession, Depends(changing)]
