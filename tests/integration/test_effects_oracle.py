"""The effects oracle: thousands of effects of both example domains, exactly once, under faults.

Commands of the support desk (refunds and e-mails) and of deploys (promotions) for four
tenants are decided first; then two ``keel effects run`` processes carry the effects to a
provider simulator (a real HTTP server) that answers slowly, with 5xx (half of them after
performing) and with timeouts (after performing), while the workers are SIGKILLed and
restarted over and over, and one tenant's deploy agent is switched off and on again.
Afterwards:

- every effect has exactly one recorded outcome, and it is ``EffectSucceeded``;
- the simulator performed every effect exactly once, counted by idempotency key, and
  nothing else;
- nothing of the switched-off agent was performed while its kill switch was on.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploys.messages import DeployPreview, PromoteRelease
from keel.config import Settings
from keel.domain.commands import SetKillSwitch, SwitchScope
from keel.domain.effects import idempotency_key
from keel.domain.envelope import Actor, ActorKind, Envelope
from keel.domain.events import EffectCancelled, EffectFailed, EffectSucceeded, KillSwitchEngaged, KillSwitchReleased
from keel.domain.governance.pipeline import CONTROLS_AGGREGATE
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.domains.registry import current
from keel.kafka.reader import read_to_end, record_headers
from keel.kafka.topics import Topic, topic_name
from keel.testing.provider import Faults, ProviderSimulator
from support_desk.messages import SendEmail
from tests.helpers import command, events, refund, send, start
from tests.processes import KeelProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TENANTS = ("acme", "globex", "initech", "umbrella")
SUBSCRIPTIONS_PER_TENANT = 420  # a refund and an e-mail each: 3,360 effects
SERVICES_PER_TENANT = 150  # three promotions each: 1,800 effects
DEPLOY_AGENT = Actor(kind=ActorKind.AGENT, id="deploy-bot")
SWITCHED = ("globex", DEPLOY_AGENT.id)
MIN_KILLS = 20
OUTCOMES = ("EffectSucceeded", "EffectFailed", "EffectCancelled")
PROPAGATION_S = 1.0
"""How long after the switch's decision a request begun before workers saw it may still arrive at the provider."""


def workload() -> list[Envelope]:
    """Every tenant's commands, aggregate by aggregate interleaved round by round."""
    plans: list[list[Envelope]] = []
    for tenant in TENANTS:
        for n in range(SUBSCRIPTIONS_PER_TENANT):
            aggregate = f"sub-{n}"
            plans.append([command(tenant, aggregate, start(10_000)), command(tenant, aggregate, refund(100 + n)),
                          command(tenant, aggregate, SendEmail(to_address=f"c{n}@example.com", template="t"))])
        for n in range(SERVICES_PER_TENANT):
            service = f"svc-{n}"
            plans.append([command(tenant, service, payload, actor=DEPLOY_AGENT, on_behalf_of=None) for payload in (
                DeployPreview(release="v1", commit_sha="abc1234"), PromoteRelease(release="v1", percent=10),
                PromoteRelease(release="v1", percent=40), PromoteRelease(release="v1", percent=90))])
    return [plan[i] for i in range(4) for plan in plans if i < len(plan)]


def switch(settings: Settings, engaged: bool) -> None:
    tenant, agent = SWITCHED
    send(settings, command(tenant, CONTROLS_AGGREGATE, SetKillSwitch(
        scope=SwitchScope.AGENT, target=agent, engaged=engaged, reason="oracle"), actor=SYSTEM_ACTOR))


class EffectWorker(KeelProcess):
    def __init__(self, settings: Settings, name: str, logs: Path, provider: str) -> None:
        super().__init__(["effects", "run", "--no-supervise", "--instance", name], settings, logs / f"{name}.log",
                         KEEL_EFFECTS_STATIC_MEMBERSHIP="true", SUPPORT_DESK_PAYMENTS_URL=provider, SUPPORT_DESK_EMAIL_URL=provider,
                         DEPLOYS_TARGET_URL=provider)


@pytest.fixture
def provider() -> Iterator[ProviderSimulator]:
    with ProviderSimulator() as simulator:
        yield simulator


def test_every_effect_is_performed_once_and_recorded_once_under_kills_and_faults(
        settings: Settings, tmp_path: Path, provider: ProviderSimulator) -> None:
    triggers = set(current().effect_of)
    processor = KeelProcess(["process", "--no-supervise", "--instance", "p1"], settings, tmp_path / "p1.log")
    workers = [EffectWorker(settings, name, tmp_path, provider.url) for name in ("e1", "e2")]
    try:
        processor.start()
        commands = workload()
        send(settings, *commands)
        expected = 2 * len(TENANTS) * SUBSCRIPTIONS_PER_TENANT + 3 * len(TENANTS) * SERVICES_PER_TENANT
        _await(settings, triggers, expected, 240, "the processor deciding the workload")
        effects = {e.id: e for e in events(settings) if e.type in triggers}
        assert len(effects) == expected >= 5_000
        assert {e.type for e in effects.values()} == {"RefundIssued", "EmailQueued", "ReleasePromoted"}

        provider.set_faults(Faults(latency_ms=5, slow_rate=0.05, slow_ms=400, error_rate=0.06, timeout_rate=0.01,
                                   hang_s=12, seed=3))
        for worker in workers:
            worker.start()
        rng, kills, started = random.Random(5), 0, time.monotonic()
        on_at = off_at = None
        while True:
            time.sleep(rng.uniform(2.0, 5.0))
            settled = sum(_types(settings)[kind] for kind in OUTCOMES)
            if on_at is None:
                switch(settings, engaged=True)
                on_at = _switched_at(settings, KillSwitchEngaged)
            elif on_at is not None and off_at is None and time.time() - on_at.timestamp() > 8:
                off_at = datetime.now(UTC)
                switch(settings, engaged=False)
            if kills >= MIN_KILLS and off_at is not None and settled >= len(effects):
                break
            assert time.monotonic() - started < 420, f"{settled}/{len(effects)} effects settled after 420 s"
            victim = rng.choice(workers)
            victim.kill()
            victim.start()
            kills += 1
        elapsed = time.monotonic() - started
    finally:
        for worker in workers:
            worker.kill()
        processor.kill()

    outcomes = [e for e in events(settings) if isinstance(e.payload, (EffectSucceeded, EffectFailed, EffectCancelled))]
    per_effect = Counter(e.payload.effect_id for e in outcomes)  # type: ignore[attr-defined]
    assert set(per_effect) == set(effects), "an effect has no outcome, or an outcome names no effect"
    assert [i for i, n in per_effect.items() if n > 1] == [], "an effect has two recorded outcomes"
    failed = [e.payload for e in outcomes if not isinstance(e.payload, EffectSucceeded)]
    assert failed == [], f"{len(failed)} effects did not succeed, e.g. {failed[:3]}"

    performed = provider.performed()
    assert set(performed) == {idempotency_key(i) for i in effects}, "the provider performed something else"
    assert [k for k, a in performed.items() if a.count != 1] == [], "an effect was performed twice"
    assert on_at is not None and off_at is not None
    quiet_from = on_at.timestamp() + PROPAGATION_S
    during = [a for a in performed.values() if (a.tenant, a.agent) == SWITCHED
              and quiet_from <= a.received_at.timestamp() < off_at.timestamp()]
    assert during == [], (f"{len(during)} effects of the switched-off agent ran while the switch was on "
                          f"({on_at} to {off_at}): " + ", ".join(f"{a.path} at {a.received_at}" for a in during))
    waited = [a for a in performed.values() if (a.tenant, a.agent) == SWITCHED and a.received_at > off_at]
    assert waited, "the switch must have held some of the agent's effects back"
    stats = provider.stats()
    assert stats.replays > 0, "the faults must have made workers retry actions the provider had performed"
    print(f"\n{len(effects)} effects, {kills} SIGKILLs, {stats.requests} provider requests "
          f"({stats.replays} replays) in {elapsed:.0f}s; {len(waited)} waited for the kill switch")


def _types(settings: Settings) -> Counter[str]:
    """How many events of each type the events topic holds (from the record headers: no decoding)."""
    return Counter((dict(record_headers(m)).get("keel-type") or b"").decode()
                   for m in read_to_end(settings, topic_name(settings, Topic.EVENTS)))


def _switched_at(settings: Settings, kind: type[KillSwitchEngaged | KillSwitchReleased]) -> datetime:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = [e.occurred_at for e in events(settings) if isinstance(e.payload, kind)]
        if found:
            return found[-1]
        time.sleep(0.2)
    raise AssertionError(f"no {kind.__name__} event within 60 s")


def _await(settings: Settings, types: set[str], expected: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = _types(settings)
        found = sum(counts[kind] for kind in types)
        if found >= expected or time.monotonic() > deadline:
            assert found == expected, f"{what}: {found} of {expected} within {timeout_s} s"
            return
        time.sleep(1)
