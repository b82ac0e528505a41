"""A small domain whose effects the tests steer: cards charged, and refunded to undo a charge.

A ``Charge`` names its handler's ``behaviour`` (see ``charge``); every call of a handler is
appended to ``calls.jsonl`` in the domain's folder, with the idempotency key, the attempt
and the e-mail address as the handler saw it (personal fields are sealed on the wire and
opened for the call). The folder is ``EFFECTS_DOMAIN_DIR``: a test writes the schemas
there (``write_schemas``) and names it, with ``KEEL_DOMAINS=tests.effects_domain``, to the
Keel processes it starts. ``without_effects`` is the same domain without its effects: a
worker that registers it has no handler for them.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import Field

from keel.contracts.evolution import freeze, owner_of
from keel.domains import (
    Aggregate,
    Command,
    Domain,
    EffectCall,
    EffectResult,
    EmailAddress,
    Envelope,
    Event,
    PermanentError,
    RetryableError,
    Undo,
)
from keel.domains.model import Effect

DIR_ENV = "EFFECTS_DOMAIN_DIR"
PROVIDER = "cards"
DOWN = "provider-down"
"""While this file exists in the domain's folder, ``down`` charges fail retryably."""


class Charge(Command):
    amount_cents: int = Field(ge=1)
    email: EmailAddress
    behaviour: str = Field(default="ok", description="What the charge handler does: see ``charge``.")


class RefundCharge(Command):
    undoes: uuid.UUID
    reason: str = Field(min_length=1, max_length=500)


class Charged(Event):
    amount_cents: int
    email: EmailAddress
    behaviour: str


class ChargeRefunded(Event):
    undoes: uuid.UUID
    reason: str


def decide(state: int, command: Envelope) -> list[Event]:
    match command.payload:
        case Charge() as charge:
            return [Charged(amount_cents=charge.amount_cents, email=charge.email, behaviour=charge.behaviour)]
        case RefundCharge() as refund:
            return [ChargeRefunded(undoes=refund.undoes, reason=refund.reason)]
    raise AssertionError(command.type)


def evolve(state: int, event: Envelope) -> int:
    return state + 1


def home() -> Path:
    return Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / "keel-effects-domain")


def calls(folder: Path) -> list[dict[str, Any]]:
    """Every handler call so far, in order."""
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _record(call: EffectCall, handler: str, **extra: object) -> None:
    payload = call.event.payload
    line = json.dumps({"handler": handler, "effect_id": str(call.event.id), "key": call.idempotency_key,
                       "attempt": call.attempt, "pid": os.getpid(), "at": time.time(),
                       "email": getattr(payload, "email", None), **extra})
    with (home() / "calls.jsonl").open("a") as out:  # one short append per call: lines never interleave
        out.write(line + "\n")


def charge(call: EffectCall) -> EffectResult:
    """A synchronous handler doing what the charge's ``behaviour`` says.

    ``ok``: succeed. ``flaky``: fail retryably twice, then succeed. ``decline``: fail for
    good. ``decline_once``: fail for good the first time the effect is called, then succeed
    (when an operator retries it). ``hang``: the first attempt outlives its timeout.
    ``garbage``: return a list. ``down``: fail retryably while ``DOWN`` exists. ``slow``:
    take a quarter of a second (half the timeout).
    """
    behaviour = call.event.payload.behaviour  # type: ignore[attr-defined]
    _record(call, "charge", behaviour=behaviour)
    if behaviour == "flaky" and call.attempt <= 2:
        raise RetryableError("503 from the card network")
    declined = home() / f"declined-{call.event.id}"
    if behaviour == "decline" or (behaviour == "decline_once" and not declined.exists()):
        declined.touch()
        raise PermanentError("card_declined", "the issuer declined the card")
    if behaviour == "hang" and call.attempt == 1:
        time.sleep(2.0)
    if behaviour == "garbage":
        return ["not", "an", "object"]  # type: ignore[return-value]
    if behaviour == "down" and (home() / DOWN).exists():
        raise RetryableError("connection refused")
    if behaviour == "slow":
        time.sleep(0.25)
    return {"charge_id": f"ch_{call.idempotency_key[-12:]}", "attempt": call.attempt}


async def refund(call: EffectCall) -> EffectResult:
    """An async handler: refunds always succeed, a little later."""
    _record(call, "refund")
    await asyncio.sleep(0.01)
    return {"refunded": str(call.event.payload.undoes)}  # type: ignore[attr-defined]


def _refund_command(event: Envelope, reason: str) -> RefundCharge:
    assert event.causation_id is not None
    return RefundCharge(undoes=event.causation_id, reason=reason)


def make_domain(folder: Path) -> Domain:
    """The domain, its schemas under ``folder``."""
    cards = Aggregate(name="card", initial=0, commands=(Charge, RefundCharge), events=(Charged, ChargeRefunded),
                      decide=decide, evolve=evolve)
    return Domain(
        name="effects_test", home=folder, aggregates=(cards,),
        undo={Charged: Undo(by=ChargeRefunded, command=_refund_command, names_undone="undoes")},
        effects=(Effect(on=Charged, handler=charge, provider=PROVIDER, timeout_s=0.5, max_attempts=6, backoff_s=0.05,
                        max_backoff_s=0.2),
                 Effect(on=ChargeRefunded, handler=refund, provider=PROVIDER)))


def write_schemas(folder: Path) -> None:
    """Write the domain's schemas under ``folder`` (as ``keel schemas freeze`` would)."""
    freeze([owner_of(make_domain(folder))])


domain = make_domain(home())
without_effects = replace(domain, effects=())
