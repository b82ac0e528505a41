"""The console's typed refusals: each one a status and a message a person can act on.

They render as HTML (a page, or a fragment for htmx), never as the API's JSON, and none of
them is a 500: a refusal means nothing was changed.
"""

from __future__ import annotations

from keel.errors import KeelError


class ConsoleError(KeelError):
    """A refusal of the console; ``status`` is its HTTP status."""

    code = "console_error"
    status = 400


class SignInRequired(ConsoleError):
    """No session, or one that is unknown, forged, expired, signed out or whose key was revoked."""

    code = "sign_in_required"
    status = 401


class NotAPerson(ConsoleError):
    """The key is an agent's or a service's: the console is for people."""

    code = "not_a_person"
    status = 403


class CsrfRefused(ConsoleError):
    """A change came without this session's CSRF token (or with another one)."""

    code = "csrf_refused"
    status = 403


class NotFoundHere(ConsoleError):
    """Nothing with this id in the caller's tenant (another tenant's ids read the same as unknown ones)."""

    code = "not_found"
    status = 404


class BadInput(ConsoleError):
    """A form field is missing, too long or malformed."""

    code = "bad_input"
    status = 422


class Refused(ConsoleError):
    """The processor decided the change and refused it (``not_pending``, ``self_approval``, a role…)."""

    code = "refused"
    status = 409


class TooLarge(ConsoleError):
    """A request body far larger than any console form."""

    code = "payload_too_large"
    status = 413
