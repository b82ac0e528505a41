"""Deciding what happens to an aggregate's effects: outcomes, cancellations and retries.

Pure, like the rest of governance: the processor supplies the aggregate's effects (see
``keel.domain.effects``). An outcome is accepted once per generation: the first of
``CompleteEffect``, ``FailEffect`` or ``CancelEffect`` settles the effect, and any later one
is refused with ``effect_settled``, so every effect has exactly one recorded outcome
however many workers ran it. Only Keel's own services report what a handler did.
"""

from __future__ import annotations

import uuid

from keel.domain.commands import CancelEffect, CompleteEffect, FailEffect, RetryEffect
from keel.domain.effects import EffectMark
from keel.domain.envelope import Envelope, Payload
from keel.domain.events import EffectCancelled, EffectFailed, EffectRetried, EffectSucceeded
from keel.domain.governance.policy import is_system

EFFECT_COMMANDS = (CompleteEffect, FailEffect, CancelEffect, RetryEffect)

Refused = tuple[str, str]
"""(code, reason) of a refusal."""


def settle(command: Envelope, effects: dict[uuid.UUID, EffectMark]) -> Payload | Refused:
    """The event ``command`` records about one of ``effects``, or why it is refused."""
    payload = command.payload
    assert isinstance(payload, EFFECT_COMMANDS)
    if isinstance(payload, (CompleteEffect, FailEffect)) and not is_system(command.actor):
        return "system_only", f"only Keel's effect workers report what a handler did, not {command.actor.id}"
    mark = effects.get(payload.effect_id)
    if mark is None:
        return "unknown_effect", (f"effect {payload.effect_id} is not open, failed or cancelled on "
                                  f"{command.aggregate_id} (a succeeded effect cannot change)")
    effect_id, origin = payload.effect_id, mark.origin_command_id
    match payload:
        case RetryEffect(reason=reason, event_partition=partition, event_offset=offset):
            if mark.open:
                return "effect_open", f"effect {effect_id} has no outcome yet; only a failed or cancelled one is retried"
            return EffectRetried(effect_id=effect_id, origin_command_id=origin, generation=mark.generation + 1,
                                 reason=reason, event_partition=partition, event_offset=offset)
        case CompleteEffect(generation=generation) | FailEffect(generation=generation) if (
                not mark.open or generation != mark.generation):
            return "effect_settled", (f"effect {effect_id} generation {generation} already has an outcome "
                                      f"(it is at generation {mark.generation}, open={mark.open})")
        case CancelEffect() if not mark.open:
            return "effect_settled", f"effect {effect_id} already has an outcome"
        case CompleteEffect(provider=provider, attempts=attempts, result=result):
            return EffectSucceeded(effect_id=effect_id, origin_command_id=origin, generation=mark.generation,
                                   provider=provider, attempts=attempts, result=result)
        case FailEffect(provider=provider, attempts=attempts, code=code, error=error):
            return EffectFailed(effect_id=effect_id, origin_command_id=origin, generation=mark.generation,
                                provider=provider, attempts=attempts, code=code, error=error)
        case CancelEffect(code=code, reason=reason):
            return EffectCancelled(effect_id=effect_id, origin_command_id=origin, generation=mark.generation,
                                   code=code, reason=reason)
    raise AssertionError(command.type)
