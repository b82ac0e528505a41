"""The service aggregate as pure functions: ``decide(state, command)`` and ``evolve``.

A service has one release rolling out at a time. Each promotion raises its share of the
traffic; a rollback undoes the latest standing promotion, returning the share it had
before, so rollbacks unwind a rollout step by step in reverse order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from keel.domains import Envelope, Event, Rejected

from deploys.messages import (
    DeployPreview,
    PreviewDeployed,
    PromoteRelease,
    ReleasePromoted,
    ReleaseRolledBack,
    RollBack,
)


@dataclass(frozen=True)
class Promotion:
    """A standing promotion: the command that made it and the share it raised."""

    command_id: uuid.UUID
    previous_percent: int


@dataclass(frozen=True)
class ServiceState:
    """What the system knew about one service's releases."""

    previews: frozenset[str] = frozenset()
    release: str | None = None
    """The release rolling out (or rolled out) to users."""
    percent: int = 0
    """Its share of the traffic; the rest goes to the release before it."""
    promotions: tuple[Promotion, ...] = ()
    """The standing promotions of ``release``, oldest first: what a rollback can undo."""


INITIAL = ServiceState()


def decide(state: ServiceState, command: Envelope) -> list[Event]:
    """What ``command`` yields against ``state``; raises ``Rejected`` to refuse it."""
    match command.payload:
        case DeployPreview() as preview:
            if preview.release in state.previews:
                raise Rejected("preview_exists", f"release {preview.release} already has a preview")
            return [PreviewDeployed(release=preview.release, commit_sha=preview.commit_sha)]
        case PromoteRelease() as promote:
            if promote.release not in state.previews:
                raise Rejected("no_preview", f"release {promote.release} was never deployed to preview")
            if promote.release == state.release:
                if promote.percent <= state.percent:
                    raise Rejected("percent_must_grow",
                                   f"{promote.release} already serves {state.percent} % of the traffic")
                return [ReleasePromoted(release=promote.release, percent=promote.percent,
                                        previous_percent=state.percent)]
            if 0 < state.percent < 100:
                raise Rejected("rollout_in_progress",
                               f"{state.release} is rolling out ({state.percent} %); finish or roll it back first")
            return [ReleasePromoted(release=promote.release, percent=promote.percent, previous_percent=0)]
        case RollBack() as rollback:
            standing = [p.command_id for p in state.promotions]
            if state.release is None or rollback.promotion_id not in standing:
                raise Rejected("nothing_to_roll_back",
                               f"no standing promotion from command {rollback.promotion_id} on this service")
            if rollback.promotion_id != standing[-1]:
                raise Rejected("later_promotion_stands", "roll back the later promotions of this release first")
            return [ReleaseRolledBack(release=state.release, from_percent=state.percent,
                                      percent=state.promotions[-1].previous_percent,
                                      reverses=rollback.promotion_id, reason=rollback.reason)]
    raise Rejected("unsupported_command", f"{command.type} is not a service command")


def evolve(state: ServiceState, event: Envelope) -> ServiceState:
    """The state after ``event``."""
    match event.payload:
        case PreviewDeployed() as preview:
            return replace(state, previews=state.previews | {preview.release})
        case ReleasePromoted() as promoted:
            earlier = state.promotions if promoted.release == state.release else ()
            made = () if event.causation_id is None else (Promotion(event.causation_id, promoted.previous_percent),)
            return replace(state, release=promoted.release, percent=promoted.percent, promotions=earlier + made)
        case ReleaseRolledBack() as rolled_back:
            return replace(state, percent=rolled_back.percent,
                           promotions=tuple(p for p in state.promotions if p.command_id != rolled_back.reverses))
    return state
