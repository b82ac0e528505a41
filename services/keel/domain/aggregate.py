"""An aggregate's full state: its version, its domain state, the commands parked on it and
the effects it still owes.

The domain state belongs to whichever registered aggregate type the key's first domain event
came from (``None`` before it); Keel owns the version, the parked commands and the effects,
so a team's ``evolve`` only ever sees its own events.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from keel.domain.effects import EffectMark, fold_effects
from keel.domain.envelope import Envelope
from keel.domain.governance.approvals import Parked, fold_pending
from keel.domains.registry import Registry, current


@dataclass(frozen=True)
class AggregateState:
    """What one ``tenant/aggregate`` looks like after its events."""

    version: int = 0
    aggregate: str | None = None
    """The registered aggregate type holding ``domain``; ``None`` until its first event."""
    domain: object = None
    pending: dict[uuid.UUID, Parked] = field(default_factory=dict)
    effects: dict[uuid.UUID, EffectMark] = field(default_factory=dict)


EMPTY = AggregateState()


def evolve_aggregate(state: AggregateState, event: Envelope, registry: Registry | None = None) -> AggregateState:
    """The state after ``event``: the same fold everywhere (processor, replay, state).

    ``registry``: whose aggregates fold (default: this process's, ``keel.testing`` passes its own).
    """
    registry = registry or current()
    pending = fold_pending(state.pending, event)
    version = event.version
    if version is None:
        return state if pending is state.pending else AggregateState(
            state.version, state.aggregate, state.domain, pending, state.effects)
    effects = fold_effects(state.effects, event, registry)
    owner = registry.aggregate_of.get(event.type)
    if owner is None:  # Keel's own events (approvals, effects) move the version, not the domain state
        return AggregateState(version, state.aggregate, state.domain, pending, effects)
    base = state.domain if state.aggregate == owner.name else owner.initial
    return AggregateState(version, owner.name, owner.evolve(base, event), pending, effects)
