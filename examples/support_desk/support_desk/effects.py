"""The support desk's effects: refunds and their reversals at the payments provider, e-mails at the e-mail one.

Each handler makes one POST under the effect's idempotency key, so however often Keel
retries it, the provider refunds or sends once. The providers' URLs are read from the
environment at each call (``SUPPORT_DESK_PAYMENTS_URL``, ``SUPPORT_DESK_EMAIL_URL``): one
worker image serves every environment, and a test points them at ``keel.testing.provider``.
Results name what the provider made and never hold personal data, because Keel records
them in ``EffectSucceeded`` for everyone who reads the tenant's events.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import weakref
from typing import Any

import aiohttp

from keel.domains import EffectCall, EffectResult, PermanentError, RetryableError

from support_desk.messages import EmailQueued, RefundIssued, RefundReversed

PAYMENTS_URL = "SUPPORT_DESK_PAYMENTS_URL"
EMAIL_URL = "SUPPORT_DESK_EMAIL_URL"

_MARGIN_S = 0.1
"""How much sooner than the attempt's deadline a request gives up, so the handler reports the timeout."""
_RETRYABLE = frozenset({408, 409, 429})
"""4xx answers that mean "not now" (a timeout, the key's request in flight, a rate limit); other 4xx are final."""

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()


def _session() -> aiohttp.ClientSession:
    """This event loop's session: it pools connections across calls, and cannot serve another loop."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        session = _sessions[loop] = aiohttp.ClientSession()
    return session


async def close() -> None:
    """Close this event loop's session (a worker's shutdown, a test's end)."""
    session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()


def _decode(text: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(text)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


async def _post(call: EffectCall, url_variable: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` to the provider under the call's idempotency key: its JSON answer, or the error to raise."""
    base = os.environ.get(url_variable)
    if not base:
        raise PermanentError("provider_not_configured", f"set {url_variable} to the {call.provider} provider's URL")
    budget = call.deadline.timestamp() - time.time() - _MARGIN_S
    if budget <= 0:
        raise RetryableError(f"no time left to call {call.provider} before the attempt's deadline")
    headers = {"Idempotency-Key": call.idempotency_key, "X-Keel-Tenant": call.event.tenant_id,
               "X-Keel-Agent": call.event.actor.id}
    try:
        async with _session().post(base.rstrip("/") + path, json=body, headers=headers, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=budget)) as response:
            status, answer = response.status, _decode(await response.read())
    except aiohttp.InvalidURL as exc:
        raise PermanentError("provider_not_configured", f"{url_variable} is not a URL: {exc}") from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RetryableError(f"{call.provider} did not answer: {exc!r}") from exc
    if 200 <= status < 300:
        return answer
    detail = answer.get("error")
    error: dict[str, Any] = detail if isinstance(detail, dict) else {}
    message = f"{call.provider} answered {status}: {error.get('message', '')}"
    if status in _RETRYABLE or status >= 500:
        raise RetryableError(message)
    raise PermanentError(str(error.get("code") or f"http_{status}"), message)


async def issue_refund(call: EffectCall) -> EffectResult:
    """Refund at the payments provider, referenced by the refund's command: what its reversal names."""
    refund = call.event.payload
    assert isinstance(refund, RefundIssued)
    reference = str(call.event.causation_id)
    answer = await _post(call, PAYMENTS_URL, "/v1/refunds",
                         {"amount_cents": refund.amount_cents, "currency": refund.currency, "reference": reference})
    return {"refund_id": answer.get("id"), "reference": reference, "amount_cents": refund.amount_cents,
            "currency": refund.currency}


async def reverse_refund(call: EffectCall) -> EffectResult:
    """Reverse the refund its command made; a refund the provider never made fails for good (refund_not_found)."""
    reversal = call.event.payload
    assert isinstance(reversal, RefundReversed)
    reference = str(reversal.reverses)
    answer = await _post(call, PAYMENTS_URL, "/v1/refunds/reversals", {"reference": reference})
    return {"reversal_id": answer.get("id"), "refund_id": answer.get("refund"), "reference": reference}


async def send_email(call: EffectCall) -> EffectResult:
    """Send the queued e-mail; the address and text go to the provider and nowhere else."""
    email = call.event.payload
    assert isinstance(email, EmailQueued)
    answer = await _post(call, EMAIL_URL, "/v1/emails",
                         {"to": email.to_address, "template": email.template, "body": email.body})
    return {"email_id": answer.get("id"), "template": email.template}
