"""The deploys domain's effects, as its domain declares them, against a provider simulator process."""

from __future__ import annotations

import asyncio
import inspect
from datetime import UTC, datetime, timedelta

import pytest

from keel.domain.effects import idempotency_key
from keel.domain.envelope import Envelope
from keel.domains import EffectCall, EffectResult, PermanentError, RetryableError, http
from keel.testing import Scenario, scenario
from keel.testing.provider import Faults, ProviderSimulator

from deploys import domain, effects
from deploys.messages import DeployPreview, PromoteRelease, RollBack


@pytest.fixture
def target(keel_provider: ProviderSimulator, monkeypatch: pytest.MonkeyPatch) -> ProviderSimulator:
    """The simulator as the deploy target."""
    monkeypatch.setenv(effects.TARGET_URL, keel_provider.url)
    return keel_provider


def promoted(percent: int = 25) -> Scenario:
    """acme's checkout with v2 previewed, then promoted to ``percent``."""
    return (scenario(domain, tenant="acme", aggregate="checkout", actor="agent:deploy-bot")
            .given(DeployPreview(release="v2", commit_sha="3f9c2ab"))
            .when(PromoteRelease(release="v2", percent=percent)))


def run(event: Envelope, *, key: str | None = None) -> EffectResult:
    """One attempt of the event's declared effect, as Keel's worker makes it, on a loop of its own."""
    effect = next(e for e in domain.effects if e.on.__name__ == event.type)
    call = EffectCall(event=event, idempotency_key=key or idempotency_key(event.id), attempt=1,
                      deadline=datetime.now(UTC) + timedelta(seconds=5), provider=effect.provider)

    async def once() -> EffectResult:
        try:
            result = effect.handler(call)
            return await result if inspect.isawaitable(result) else result
        finally:
            await http.close()
    return asyncio.run(once())


def test_a_promotion_shifts_the_traffic_once_under_the_effects_key(target: ProviderSimulator) -> None:
    event = promoted(25).decided.events[0]
    first, retried = run(event), run(event)

    assert first == retried == {"deployment_id": "act_1", "release": "v2", "percent": 25}
    action = target.performed()[idempotency_key(event.id)]
    assert (action.count, action.path, action.tenant, action.agent) == (1, "/v1/deployments", "acme", "deploy-bot")
    assert action.body == {"service": "checkout", "release": "v2", "percent": 25, "previous_percent": 0}


def test_a_rollback_names_the_promotion_it_undoes(target: ProviderSimulator) -> None:
    story = promoted(25)
    rolled_back = story.when(RollBack(promotion_id=story.decided.command.id, reason="errors up"))
    event = rolled_back.decided.events[0]

    assert run(event) == {"rollback_id": "act_1", "release": "v2", "percent": 0}
    assert target.performed()[idempotency_key(event.id)].body == {
        "service": "checkout", "release": "v2", "from_percent": 25, "percent": 0,
        "reverses": str(story.decided.command.id)}


def test_5xx_answers_are_retryable(target: ProviderSimulator) -> None:
    target.set_faults(Faults(error_rate=1.0, seed=1))
    with pytest.raises(RetryableError, match="deploy-target answered 50[03]"):
        run(promoted().decided.events[0])


def test_a_key_reused_for_another_promotion_fails_for_good(target: ProviderSimulator) -> None:
    run(promoted(25).decided.events[0], key="key-1")
    with pytest.raises(PermanentError) as failed:
        run(promoted(50).decided.events[0], key="key-1")
    assert failed.value.code == "idempotency_key_reused"


def test_an_unset_url_fails_as_not_configured(target: ProviderSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(effects.TARGET_URL)
    with pytest.raises(PermanentError) as failed:
        run(promoted().decided.events[0])
    assert failed.value.code == "provider_not_configured"
    assert target.stats().requests == 0
