"""The provider simulator's HTTP API: actions under ``/v1``, the test's levers under ``/_control``.

Every ``POST /v1/...`` is an action that needs an ``Idempotency-Key`` (``keel.testing.provider_ledger``
keeps the keys); ``/_control`` sets faults (``keel.testing.provider_faults``), shows what was
performed and resets. Handlers are lean (orjson, no access log) so one process sustains
thousands of requests a second: latency is a sleep, not work.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
import pydantic
from aiohttp import web

from keel.testing.provider_faults import Dice, Fault, Faults
from keel.testing.provider_ledger import Answer, JSONObject, Ledger, error

_JSON = "application/json"


@dataclass
class _Simulator:
    ledger: Ledger = field(default_factory=Ledger)
    dice: Dice = field(default_factory=Dice)

    def reset(self) -> None:
        self.ledger, self.dice = Ledger(), Dice()


_STATE = web.AppKey("simulator", _Simulator)


def _respond(answer: Answer) -> web.Response:
    headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
    return web.Response(status=answer.status, body=answer.body, content_type=_JSON, headers=headers)


def _json(value: object) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type=_JSON)


async def _object(request: web.Request) -> JSONObject | None:
    """The request's JSON object body, or None when it is not one."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


async def _after(delay_s: float, answer: Answer) -> web.Response:
    await asyncio.sleep(delay_s)
    return _respond(answer)


async def act(request: web.Request) -> web.Response:
    """Perform the action at the request's path once per ``Idempotency-Key``."""
    state, received_at = request.app[_STATE], datetime.now(UTC)
    ledger, latency_s = state.ledger, state.dice.faults.latency_ms / 1000
    ledger.stats.requests += 1
    key, body = request.headers.get("Idempotency-Key"), await _object(request)
    if not key:
        return await _after(latency_s, ledger.reject(error(400, "missing_idempotency_key",
                                                           "an action needs an Idempotency-Key header")))
    if body is None:
        return await _after(latency_s, ledger.reject(error(400, "invalid_json", "the body must be a JSON object")))
    refusal = ledger.begin(key, request.path, body)
    if refusal is not None:
        return await _after(latency_s, refusal)
    return await _perform(state, request, key, body, received_at)


async def _perform(state: _Simulator, request: web.Request, key: str, body: JSONObject,
                   received_at: datetime) -> web.Response:
    """Perform under the faults: delayed, refused before performing, or answered wrongly after it."""
    ledger, dice = state.ledger, state.dice
    plan = dice.plan()
    if plan.slow:
        ledger.count(Fault.SLOW)
    await asyncio.sleep(plan.delay_s)
    if plan.failure is Fault.ERROR_503:
        ledger.count(Fault.ERROR_503)
        ledger.release(key)
        return _respond(error(503, "unavailable", "the provider is unavailable; nothing was performed"))
    answer = ledger.perform(key, request.path, body, tenant=request.headers.get("X-Keel-Tenant"),
                            agent=request.headers.get("X-Keel-Agent"), received_at=received_at)
    if answer.status >= 300 or plan.failure is None:
        return _respond(answer)
    ledger.count(plan.failure)
    if plan.failure is Fault.ERROR_500:
        return _respond(error(500, "internal_error", "the provider failed after performing the action"))
    await asyncio.sleep(dice.faults.hang_s)
    return _respond(answer)


async def set_faults(request: web.Request) -> web.Response:
    """Replace the fault settings (``{}`` clears them); the dice restart from their seed."""
    try:
        faults = Faults.model_validate_json(await request.read())
    except pydantic.ValidationError as exc:
        return _respond(error(400, "invalid_faults", str(exc)))
    request.app[_STATE].dice = Dice(faults)
    return _json(faults.model_dump())


async def performed(request: web.Request) -> web.Response:
    """Every performed action by idempotency key."""
    return _json({key: action.model_dump() for key, action in request.app[_STATE].ledger.actions.items()})


async def stats(request: web.Request) -> web.Response:
    """The totals since the last reset."""
    return _json(request.app[_STATE].ledger.stats.model_dump(mode="json"))


async def reset(request: web.Request) -> web.Response:
    """Forget every key, action, total and fault."""
    request.app[_STATE].reset()
    return _json({})


def create_app() -> web.Application:
    """The simulator's application, with empty state and no faults."""
    app = web.Application()
    app[_STATE] = _Simulator()
    app.router.add_post("/_control/faults", set_faults)
    app.router.add_get("/_control/performed", performed)
    app.router.add_get("/_control/stats", stats)
    app.router.add_post("/_control/reset", reset)
    app.router.add_post("/v1/{action:.+}", act)
    return app
