"""Deploys: agents that ship code, deploying releases to preview, promoting them to a share of
the traffic, and rolling promotions back. Promotions and rollbacks reach the deploy target as
effects (``deploys.effects``).

Registered through the ``keel.domains`` entry point in this example's ``pyproject.toml``,
like any team's domain.
"""

from __future__ import annotations

from pathlib import Path

from keel.domains import Aggregate, Domain, Effect, Envelope, Match, Outcome, Rule, Undo

from deploys import effects, service
from deploys.messages import (
    DeployPreview,
    PreviewDeployed,
    PromoteRelease,
    ReleasePromoted,
    ReleaseRolledBack,
    RollBack,
)


def roll_back(promotion: Envelope, reason: str) -> RollBack:
    """The compensation of a ``ReleasePromoted``: roll back the command that made it."""
    if promotion.causation_id is None:
        raise ValueError(f"promotion event {promotion.id} names no command to roll back")
    return RollBack(promotion_id=promotion.causation_id, reason=reason)


services = Aggregate(
    name="service",
    initial=service.INITIAL,
    commands=(DeployPreview, PromoteRelease, RollBack),
    events=(PreviewDeployed, ReleasePromoted, ReleaseRolledBack),
    decide=service.decide,
    evolve=service.evolve,
    id_pattern=r"[a-z][a-z0-9-]{0,62}",
)

domain = Domain(
    name="deploys",
    home=Path(__file__).parent,
    aggregates=(services,),
    undo={ReleasePromoted: Undo(by=ReleaseRolledBack, names_undone="reverses", command=roll_back)},
    policy=(
        # First, so no later rule can park or deny the way back.
        Rule(name="rollbacks-always-run", match=Match(command_types=frozenset({"RollBack"})),
             decision=Outcome.ALLOW),
        Rule(name="previews-run-freely", match=Match(command_types=frozenset({"DeployPreview"})),
             decision=Outcome.ALLOW),
        # All users on a release only once an admin (a role the tenant grants) says so.
        Rule(name="full-rollouts-need-an-admin",
             match=Match(command_types=frozenset({"PromoteRelease"}), payload={"percent": {"gte": 100}}),
             decision=Outcome.APPROVE),
    ),
    views=("deploys_per_service",),
    effects=(
        Effect(on=ReleasePromoted, handler=effects.promote, provider="deploy-target"),
        Effect(on=ReleaseRolledBack, handler=effects.roll_back, provider="deploy-target"),
    ),
)
