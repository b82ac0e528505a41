"""The deploys domain's effects: promotions and rollbacks carried out at the deploy target.

Each handler makes one POST under the effect's idempotency key, so however often Keel
retries it, the target shifts the traffic once. The target's URL is read from
``DEPLOYS_TARGET_URL`` at each call: one worker image serves every environment, and a test
points it at ``keel.testing.provider``.
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

from deploys.messages import ReleasePromoted, ReleaseRolledBack

TARGET_URL = "DEPLOYS_TARGET_URL"

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


async def promote(call: EffectCall) -> EffectResult:
    """Send the promoted share of the service's traffic to the release."""
    promotion = call.event.payload
    assert isinstance(promotion, ReleasePromoted)
    answer = await _post(call, TARGET_URL, "/v1/deployments",
                         {"service": call.event.aggregate_id, "release": promotion.release,
                          "percent": promotion.percent, "previous_percent": promotion.previous_percent})
    return {"deployment_id": answer.get("id"), "release": promotion.release, "percent": promotion.percent}


async def roll_back(call: EffectCall) -> EffectResult:
    """Return the release's share of the traffic to what it was before the promotion it undoes."""
    rollback = call.event.payload
    assert isinstance(rollback, ReleaseRolledBack)
    answer = await _post(call, TARGET_URL, "/v1/rollbacks",
                         {"service": call.event.aggregate_id, "release": rollback.release,
                          "from_percent": rollback.from_percent, "percent": rollback.percent,
                          "reverses": str(rollback.reverses)})
    return {"rollback_id": answer.get("id"), "release": rollback.release, "percent": rollback.percent}
