"""The effects an aggregate owes the outside world, folded from its events.

An event whose type has a registered ``Effect`` opens an effect whose id is the event's
id. Its outcome (``EffectSucceeded``, ``EffectFailed``, ``EffectCancelled``) settles it;
``EffectRetried`` opens it again as the next generation. The processor decides outcome
commands against this fold, so an effect gets exactly one outcome per generation however
many workers report one, and a retry is only accepted for an effect that failed or was
cancelled. Succeeded effects leave the fold: the fold holds what may still change.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from keel.domain.envelope import Envelope
from keel.domain.events import EffectCancelled, EffectFailed, EffectRetried, EffectSucceeded
from keel.domains.registry import Registry

_OUTCOME_NAMESPACE = uuid.UUID("3c0e6a52-9d4b-5f1e-8a7c-1b2d3e4f5a6b")


@dataclass(frozen=True)
class EffectMark:
    """One effect of an aggregate that is running, or failed or cancelled and may be retried."""

    origin_command_id: uuid.UUID
    generation: int
    open: bool
    """True while its outcome is not recorded; False once it failed or was cancelled."""


EFFECT_OUTCOME_EVENTS = frozenset({EffectSucceeded, EffectFailed, EffectCancelled, EffectRetried})
"""Keel's events about an effect already opened (each names it by ``effect_id``)."""


def fold_effects(effects: dict[uuid.UUID, EffectMark], event: Envelope,
                 registry: Registry) -> dict[uuid.UUID, EffectMark]:
    """The aggregate's effects after ``event`` (a new dict when it changes)."""
    payload = event.payload
    if event.type in registry.effect_of and event.causation_id is not None:
        return {**effects, event.id: EffectMark(event.causation_id, 0, True)}
    if not effects or type(payload) not in EFFECT_OUTCOME_EVENTS:  # most events settle none: no four class checks
        return effects
    match payload:
        case EffectSucceeded(effect_id=effect_id) if effect_id in effects:
            return {k: v for k, v in effects.items() if k != effect_id}
        case EffectFailed(effect_id=effect_id) | EffectCancelled(effect_id=effect_id) if effect_id in effects:
            mark = effects[effect_id]
            return {**effects, effect_id: EffectMark(mark.origin_command_id, mark.generation, False)}
        case EffectRetried(effect_id=effect_id, generation=generation) if effect_id in effects:
            mark = effects[effect_id]
            return {**effects, effect_id: EffectMark(mark.origin_command_id, generation, True)}
    return effects


def outcome_command_id(effect_id: uuid.UUID, generation: int) -> uuid.UUID:
    """The id of every outcome command a worker sends for one generation of an effect.

    Two workers that both ran it (after a rebalance or a crash) send the same id, and the
    processor drops the second as a duplicate.
    """
    return uuid.uuid5(_OUTCOME_NAMESPACE, f"{effect_id}/{generation}")


def idempotency_key(effect_id: uuid.UUID) -> str:
    """The key a handler passes to its provider: one per effect, across attempts, workers and retries."""
    return f"keel-{effect_id}"
