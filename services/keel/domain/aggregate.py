"""An aggregate's full state: the domain state plus the commands parked on it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from keel.domain.envelope import Envelope
from keel.domain.governance.approvals import Parked, fold_pending
from keel.domain.subscription import INITIAL, SubscriptionState, evolve


@dataclass(frozen=True)
class AggregateState:
    """What one ``tenant/aggregate`` looks like after its events."""

    subscription: SubscriptionState = INITIAL
    pending: dict[uuid.UUID, Parked] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.subscription.version


EMPTY = AggregateState()


def evolve_aggregate(state: AggregateState, event: Envelope) -> AggregateState:
    """The state after ``event``: the same ``evolve`` everywhere (processor, replay, state)."""
    return AggregateState(evolve(state.subscription, event), fold_pending(state.pending, event))
