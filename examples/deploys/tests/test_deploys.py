"""The deploys domain's rules, decided the way Keel's processor decides them (``keel.testing``), its
default policy, and one rollout end to end: the real processor, an admin's approval, ``keel undo``,
the projector and the tenant-scoped query of ``deploys_per_service``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from functools import reduce
from typing import TypeAlias

import pytest

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.aggregate import EMPTY, evolve_aggregate
from keel.domain.envelope import Actor, ActorKind, Envelope, new_command
from keel.domain.governance.pipeline import CONTROLS_AGGREGATE
from keel.domain.governance.policy import SYSTEM_ACTOR, Outcome, builtin_policy
from keel.domain.messages import ApproveCommand, SetPolicy
from keel.domains.registry import current
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations
from keel.projector.projector import EventProjector
from keel.query.service import execute
from keel.testing import Scenario, scenario
from keel.testing.pipeline import processing

from deploys import domain
from deploys.messages import (
    DeployPreview,
    PreviewDeployed,
    PromoteRelease,
    ReleasePromoted,
    ReleaseRolledBack,
    RollBack,
)
from deploys.service import Promotion, ServiceState

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SHA = "3f9c2ab"
PREVIEW = DeployPreview(release="v2", commit_sha=SHA)
TO_25, TO_60 = uuid.uuid4(), uuid.uuid4()
"""The ids of the promotions to 25 % and 60 %: what a rollback names."""

DeployCommand: TypeAlias = DeployPreview | PromoteRelease | RollBack


def promote(percent: int, release: str = "v2") -> PromoteRelease:
    return PromoteRelease(release=release, percent=percent)


def checkout() -> Scenario:
    """An empty history of acme's checkout service, acted on by the deploy agent."""
    return scenario(domain, tenant="acme", aggregate="checkout", actor="agent:deploy-bot", now=NOW)


def promoted() -> Scenario:
    """checkout with v2 previewed and promoted to 25 %, then to 60 %."""
    return checkout().given(PREVIEW).when(promote(25), command_id=TO_25).when(promote(60), command_id=TO_60)


def test_a_previewed_release_is_promoted_step_by_step() -> None:
    story = (checkout().when(PREVIEW).then(PreviewDeployed(release="v2", commit_sha=SHA))
             .when(promote(25), command_id=TO_25).then(ReleasePromoted(release="v2", percent=25, previous_percent=0))
             .when(promote(60), command_id=TO_60).then(ReleasePromoted(release="v2", percent=60, previous_percent=25)))
    assert story.version == 3
    assert story.state(ServiceState) == ServiceState(previews=frozenset({"v2"}), release="v2", percent=60,
                                                     promotions=(Promotion(TO_25, 0), Promotion(TO_60, 25)))


def test_rollbacks_unwind_the_standing_promotions_latest_first() -> None:
    story = (promoted()
             .when(RollBack(promotion_id=TO_25, reason="x")).then_rejected("later_promotion_stands")
             .when(RollBack(promotion_id=TO_60, reason="errors up"))
             .then(ReleaseRolledBack(release="v2", from_percent=60, percent=25, reverses=TO_60, reason="errors up"))
             .when(RollBack(promotion_id=TO_60, reason="again")).then_rejected("nothing_to_roll_back")
             .when(RollBack(promotion_id=TO_25, reason="still bad"))
             .then(ReleaseRolledBack(release="v2", from_percent=25, percent=0, reverses=TO_25, reason="still bad")))
    state = story.state(ServiceState)
    assert (state.percent, state.promotions, story.version) == (0, (), 5)
    story.when(promote(10)).then(ReleasePromoted(release="v2", percent=10, previous_percent=0))


def test_a_release_after_a_full_rollout_starts_a_new_one() -> None:
    full = uuid.uuid4()
    story = (checkout().given(PREVIEW)
             .when(promote(100), command_id=full).then(ReleasePromoted(release="v2", percent=100, previous_percent=0))
             .given(DeployPreview(release="v3", commit_sha="a" * 40))
             .when(promote(10, "v3")).then(ReleasePromoted(release="v3", percent=10, previous_percent=0)))
    assert [p.command_id for p in story.state(ServiceState).promotions] == [story.decided.command.id]
    story.when(RollBack(promotion_id=full, reason="v2 is history")).then_rejected("nothing_to_roll_back")


@pytest.mark.parametrize(("history", "command", "code"), [
    ((), promote(25), "no_preview"),
    ((PREVIEW,), PREVIEW, "preview_exists"),
    ((PREVIEW, promote(60)), promote(25), "percent_must_grow"),
    ((PREVIEW, promote(60)), promote(60), "percent_must_grow"),
    ((PREVIEW, promote(25), DeployPreview(release="v3", commit_sha=SHA)), promote(5, "v3"), "rollout_in_progress"),
    ((PREVIEW,), RollBack(promotion_id=uuid.uuid4(), reason="x"), "nothing_to_roll_back"),
])
def test_business_rules_refuse_with_a_code_and_leave_state_unchanged(
        history: tuple[DeployCommand, ...], command: DeployCommand, code: str) -> None:
    before = checkout().given(*history)
    after = before.when(command).then_rejected(code)
    assert (after.version, after.state(ServiceState)) == (before.version, before.state(ServiceState))


def test_keel_refuses_a_service_id_outside_the_aggregate_pattern() -> None:
    checkout().when(PREVIEW, aggregate="Checkout_API").then_rejected("invalid_aggregate_id")


def test_the_registry_undoes_a_promotion_by_rolling_it_back() -> None:
    registry = current()
    [promotion] = promoted().decided.events
    assert registry.undo_of["ReleasePromoted"].command(promotion, "errors up") == RollBack(
        promotion_id=TO_60, reason="errors up")
    assert registry.undone_field["ReleaseRolledBack"] == "reverses"


BOT = Actor(kind=ActorKind.AGENT, id="deploy-bot")
ADMIN = Actor(kind=ActorKind.HUMAN, id="ops.lead")


@pytest.mark.parametrize(("payload", "actor", "outcome", "rule"), [
    (PREVIEW, BOT, Outcome.ALLOW, "previews-run-freely"),
    (promote(99), BOT, Outcome.ALLOW, "default"),
    (promote(100), BOT, Outcome.APPROVE, "full-rollouts-need-an-admin"),
    (promote(100), ADMIN, Outcome.APPROVE, "full-rollouts-need-an-admin"),
    (RollBack(promotion_id=TO_25, reason="x"), BOT, Outcome.ALLOW, "rollbacks-always-run"),
])
def test_the_default_policy(payload: DeployCommand, actor: Actor, outcome: Outcome, rule: str) -> None:
    command = new_command(payload, tenant_id="acme", aggregate_id="checkout", actor=actor)
    assert builtin_policy(domain.policy).evaluate(command, NOW) == (outcome, rule)


# --- end to end -------------------------------------------------------------------------------

POLICY = {
    "version": "deploys-1",
    "roles": {"deployer": ["DeployPreview", "PromoteRelease", "RollBack"], "admin": ["*"]},
    "grants": {f"{BOT.kind}:{BOT.id}": ["deployer"], f"{ADMIN.kind}:{ADMIN.id}": ["admin"]},
    "rules": [rule.model_dump(mode="json") for rule in domain.policy],  # the domain's defaults, unchanged
}
PER_SERVICE = "SELECT tenant_id, service, deploys, promotions, rollbacks, release, percent FROM deploys_per_service"


def keel(settings: Settings, *args: str) -> None:
    """Run ``keel ARGS`` as its own process on ``settings``' topics and data dir."""
    env = {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_DATA_DIR": str(settings.data_dir),
           "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers}
    result = subprocess.run([sys.executable, "-m", "keel.cli", *args], env=env, text=True, capture_output=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def events(settings: Settings, tenant: str, aggregate: str) -> list[Envelope]:
    """The committed events of one aggregate, in log order."""
    codec = EnvelopeCodec()
    decoded = (codec.decode(m.value() or b"") for m in read_to_end(settings, topic_name(settings, Topic.EVENTS)))
    return [e for e in decoded if (e.tenant_id, e.aggregate_id) == (tenant, aggregate)]


@pytest.mark.integration
def test_a_full_rollout_waits_for_an_admin_and_its_undo_rolls_it_back(keel_settings: Settings) -> None:
    with processing(keel_settings) as pipeline:
        def command(payload: DeployCommand | ApproveCommand, actor: Actor = BOT, tenant: str = "acme") -> Envelope:
            return new_command(payload, tenant_id=tenant, aggregate_id="checkout", actor=actor)

        pipeline.run(new_command(SetPolicy(document=json.dumps(POLICY)), tenant_id="acme",
                                 aggregate_id=CONTROLS_AGGREGATE, actor=SYSTEM_ACTOR))
        full = command(promote(100))
        elsewhere = command(DeployPreview(release="v7", commit_sha=SHA), tenant="globex")
        previewed, at_25, parked, _ = pipeline.run(command(PREVIEW), command(promote(25)), full, elsewhere)
        assert previewed.payloads == [PreviewDeployed(release="v2", commit_sha=SHA)]
        assert at_25.payloads == [ReleasePromoted(release="v2", percent=25, previous_percent=0)]
        [request] = parked.events
        assert (request.type, request.authority.policy_rule) == ("ApprovalRequested", "full-rollouts-need-an-admin")

        [approved] = pipeline.run(command(ApproveCommand(command_id=full.id), actor=ADMIN))
        assert [e.type for e in approved.events] == ["ApprovalGranted", "ReleasePromoted"]
        keel(keel_settings, "undo", str(full.id), "--tenant", "acme", "--as", f"{ADMIN.kind}:{ADMIN.id}",
             "--reason", "error rate doubled")
        pipeline.run()  # decide the compensation `keel undo` sent

    trail = events(keel_settings, "acme", "checkout")
    assert [(e.type, e.actor.id) for e in trail] == [
        ("PreviewDeployed", "deploy-bot"), ("ReleasePromoted", "deploy-bot"), ("ApprovalRequested", "deploy-bot"),
        ("ApprovalGranted", "ops.lead"), ("ReleasePromoted", "deploy-bot"), ("ReleaseRolledBack", "ops.lead")]
    rollback = trail[-1]
    assert rollback.payload == ReleaseRolledBack(release="v2", from_percent=100, percent=25, reverses=full.id,
                                                 reason="error rate doubled")
    assert (rollback.authority.policy_rule, rollback.correlation_id) == ("rollbacks-always-run", full.correlation_id)
    state = reduce(evolve_aggregate, trail, EMPTY).domain
    assert isinstance(state, ServiceState) and (state.release, state.percent) == ("v2", 25)

    client = connect(keel_settings)
    try:
        apply_migrations(client)
        with EventProjector(keel_settings, client) as projector:
            projector.catch_up()
    finally:
        client.close()
    rows = {tenant: execute(keel_settings, PER_SERVICE, tenant=tenant, limit=100, timeout_s=30).rows
            for tenant in ("acme", "globex", "initech")}
    assert rows == {"acme": (("acme", "checkout", 1, 2, 1, "v2", 25),),
                    "globex": (("globex", "checkout", 1, 0, 0, None, 0),),
                    "initech": ()}
