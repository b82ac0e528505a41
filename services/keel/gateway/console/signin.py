"""Signing in with a person's API key, and out.

The key is sent once, in the body of a POST, and checked against the key store (never the
gateway's short-lived key cache: a revoked key must not open a session). Only a human's key
opens one. The sign-in form itself carries a CSRF token bound to a short-lived cookie
(double submit), so no other site can sign a browser in under its own key.
"""

from __future__ import annotations

import hmac
import logging
import secrets

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from keel.domain.envelope import ActorKind
from keel.errors import KeelError
from keel.gateway.console.errors import CsrfRefused, NotAPerson
from keel.gateway.console.guard import CSRF_FIELD, Change, gateway, sessions
from keel.gateway.console.pages import PREFIX, SESSION_COOKIE, ConsoleRoute, render
from keel.gateway.console.sessions import key_id_of

log = logging.getLogger("keel.gateway.console")
SIGN_IN_COOKIE = "keel_console_sign_in"
_MAX_KEY = 200


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=PREFIX, httponly=True,
                        secure=request.url.scheme == "https", samesite="strict")


def sign_in_router() -> APIRouter:
    """``/console/sign-in`` and ``/console/sign-out``."""
    router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)

    @router.get("/sign-in")
    async def form(request: Request, ended: int = 0) -> Response:
        """The sign-in form, with a CSRF token in it and in a cookie (the browser's own, if it has one)."""
        if await to_thread.run_sync(sessions(request).find, request.cookies.get(SESSION_COOKIE)):
            return RedirectResponse(PREFIX, status_code=303)  # signed in already
        token = request.cookies.get(SIGN_IN_COOKIE) or secrets.token_urlsafe(32)
        notice = "Your session has ended. Sign in again." if ended else None
        response = render(request, "sign_in.html", csrf=token, notice=notice)
        _cookie(response, request, SIGN_IN_COOKIE, token, max_age=3600)
        return response

    @router.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        """Open a session for a human's key; any other key or a wrong one gets the form again, saying why."""
        form = await request.form()
        sent, expected = form.get(CSRF_FIELD), request.cookies.get(SIGN_IN_COOKIE, "")
        if not isinstance(sent, str) or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise CsrfRefused("the sign-in form was not this browser's own (or it expired): reload it and try again")
        key = form.get("key")
        key = key.strip() if isinstance(key, str) else ""
        try:
            if not key or len(key) > _MAX_KEY:
                raise KeelError("paste your API key (it starts with keel_)", code="missing_key")
            principal = await to_thread.run_sync(gateway(request).keys.authenticate, key)
            if principal.actor.kind is not ActorKind.HUMAN:
                raise NotAPerson(f"this is the key of {principal.actor.kind.value} {principal.actor.id}: the "
                                 "console is for people. Sign in with a human's key.")
        except KeelError as exc:
            log.info("console sign-in refused", extra={"code": exc.code})
            status = 403 if isinstance(exc, NotAPerson) else 401
            message = exc.message if isinstance(exc, NotAPerson) or exc.code == "missing_key" \
                else "this key is unknown, malformed or revoked."
            return render(request, "sign_in.html", status=status, csrf=expected, error=message)
        token, _ = await to_thread.run_sync(sessions(request).open, key_id_of(key))
        response = RedirectResponse(PREFIX, status_code=303)
        _cookie(response, request, SESSION_COOKIE, token, max_age=int(sessions(request).ttl_s))
        response.delete_cookie(SIGN_IN_COOKIE, path=PREFIX)
        return response

    @router.post("/sign-out")
    async def sign_out(request: Request, _session: Change) -> Response:
        """Delete the session; its cookie is worthless from now on, wherever it was copied."""
        await to_thread.run_sync(sessions(request).close, request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    return router
