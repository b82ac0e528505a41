"""Rendering: the Jinja2 environment, the security headers of every console answer, and the
route class that turns refusals into HTML.

Why a route class: the gateway's own handlers answer ``KeelError`` as JSON for API clients;
a person in a browser needs a page (or, for an htmx request, a fragment it swaps in). A
refusal is rendered with its status, so htmx and tests can tell it from a success.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request

from keel.errors import KeelError
from keel.gateway.console.errors import ConsoleError, NotFoundHere, SignInRequired, TooLarge
from keel.gateway.console.filters import FILTERS
from keel.gateway.console.sessions import ConsoleSession
from keel.gateway.errors import HTTP_STATUS

log = logging.getLogger("keel.gateway.console")

PREFIX = "/console"
MAX_FORM_BYTES = 64 * 1024
SESSION_COOKIE = "keel_console"

_HEADERS = {
    # Scripts and styles only from the console's own static files: htmx runs with eval off.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# Codes of the history routes' errors that the API's table does not map; any other unmapped code is a 400.
_STATUS = {"audit_unavailable": 503, "irreversible": 409, "forbidden": 403, "command_not_found": 404}


templates = Environment(loader=PackageLoader("keel.gateway.console", "templates"),
                        autoescape=select_autoescape(default=True, default_for_string=True), auto_reload=False)
templates.filters.update(FILTERS)


def is_htmx(request: Request) -> bool:
    """Whether htmx sent the request (it swaps a fragment in, rather than loading a page)."""
    return request.headers.get("hx-request") == "true"


def fragment(template: str, session: ConsoleSession | None, **context: Any) -> str:
    """``template`` rendered for ``session`` (None: signed out)."""
    return templates.get_template(template).render(session=session, prefix=PREFIX, now=time.time(), **context)


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """``template`` with ``context`` and the request's session (if any)."""
    session = getattr(request.state, "console_session", None)
    return HTMLResponse(fragment(template, session, **context), status_code=status)


def refusal(request: Request, error: KeelError, status: int) -> Response:
    """``error`` as a person reads it: a fragment for htmx, else a page (a sign-in redirect when signed out)."""
    if isinstance(error, SignInRequired) and not is_htmx(request) and request.method in ("GET", "POST") \
            and "text/event-stream" not in request.headers.get("accept", ""):
        response: Response = RedirectResponse(f"{PREFIX}/sign-in?ended=1", status_code=303)
        if request.cookies.get(SESSION_COOKIE):
            response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response
    template = "_error.html" if is_htmx(request) else "error.html"
    return render(request, template, status=status, error=error, status_code=status)


class ConsoleRoute(APIRoute):
    """A route whose refusals render as HTML and whose answers carry the console's security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > MAX_FORM_BYTES:  # forms are small: never parse a flood
                    raise TooLarge(f"the form has {declared} bytes; at most {MAX_FORM_BYTES} are accepted")
                response = await handler(request)
            except ConsoleError as exc:
                response = refusal(request, exc, exc.status)
            except KeelError as exc:  # the gateway's own checks (schema, idempotency, outbox)
                log.info("console change refused", extra={"code": exc.code, "path": request.url.path})
                response = refusal(request, exc, HTTP_STATUS.get(exc.code) or _STATUS.get(exc.code, 400))
            except RequestValidationError:  # a malformed id in the path reads as an unknown one
                response = refusal(request, NotFoundHere("there is nothing at this address"), 404)
            for name, value in _HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return guarded
