"""Calling a provider over HTTP from an effect handler: one POST under the effect's idempotency key.

``post_json(call, url_variable, path, body)`` reads the provider's base URL from the
environment at each call (one worker image serves every environment, and a test points it
at ``keel.testing.provider``), sends ``Idempotency-Key``, ``X-Keel-Tenant`` and
``X-Keel-Agent``, gives up just before the attempt's deadline, and maps the answer to what
Keel's worker understands: the JSON body of a 2xx, ``RetryableError`` for "not now" (408,
409 in flight, 429, 5xx, timeouts, connection errors), ``PermanentError`` for any other
4xx (with the provider's error code, or ``http_<status>``). Connections are pooled in one
aiohttp session per event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import weakref
from typing import Any

import aiohttp
from opentelemetry import propagate

from keel.domains.model import EffectCall, PermanentError, RetryableError

MARGIN_S = 0.1
"""How much sooner than the attempt's deadline a request gives up, so the handler reports the timeout."""
RETRYABLE = frozenset({408, 409, 429})
"""4xx answers that mean "not now" (a timeout, the key's request in flight, a rate limit); other 4xx are final."""

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()


def _session() -> aiohttp.ClientSession:
    """This event loop's session: it pools connections across calls, and cannot serve another loop."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        # No connection limit of its own (aiohttp's default is 100): the worker bounds how many
        # attempts run at once, and a smaller pool would queue attempts behind one another.
        session = _sessions[loop] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
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


async def post_json(call: EffectCall, url_variable: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` to ``$url_variable + path`` under the call's idempotency key; the provider's JSON answer."""
    base = os.environ.get(url_variable)
    if not base:
        raise PermanentError("provider_not_configured", f"set {url_variable} to the {call.provider} provider's URL")
    budget = call.deadline.timestamp() - time.time() - MARGIN_S
    if budget <= 0:
        raise RetryableError(f"no time left to call {call.provider} before the attempt's deadline")
    headers = {"Idempotency-Key": call.idempotency_key, "X-Keel-Tenant": call.event.tenant_id,
               "X-Keel-Agent": call.event.actor.id}
    propagate.inject(headers)  # the attempt's span, when traced: the provider's trace joins Keel's
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
    if status in RETRYABLE or status >= 500:
        raise RetryableError(message)
    raise PermanentError(str(error.get("code") or f"http_{status}"), message)
