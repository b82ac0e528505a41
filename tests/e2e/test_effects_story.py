"""The approval story end to end: a $5,000 refund parks, two admins approve it at the same moment,
and the payment provider is charged once, while the agent follows it on the SSE stream.

Every part is a real process on the real broker: the gateway, the relay (with the status
tracker), the processor, an effect worker and the provider simulator. The agent and the
admins act only through the gateway with their API keys.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keel.config import Settings
from keel.domain.effects import idempotency_key
from keel.domain.envelope import Actor, ActorKind
from keel.client import KeelClient
from keel.testing.provider import Faults
from tests.helpers import refund, start
from tests.platform import RunningPlatform, running_platform

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
ADMINS = (Actor(kind=ActorKind.HUMAN, id="ann.admin"), Actor(kind=ActorKind.HUMAN, id="bo.admin"))
POLICY = {"version": "story-1", "roles": {"support-agent": ["StartSubscription", "IssueRefund"], "admin": ["*"]},
          "grants": {"agent:support-bot": ["support-agent"], "human:ann.admin": ["admin"],
                     "human:bo.admin": ["admin"]},
          "rules": [{"name": "refunds-over-1000-need-an-admin", "decision": "approve",
                     "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}}}]}


@pytest.fixture
def platform(settings: Settings, tmp_path: Path) -> Iterator[RunningPlatform]:
    with running_platform(settings, tmp_path, (AGENT, *ADMINS), POLICY) as running:
        yield running


def test_a_big_refund_approved_twice_at_once_charges_the_provider_once(
        platform: RunningPlatform) -> None:
    url, tokens, provider = platform.gateway, platform.tokens, platform.provider
    agent = KeelClient(url, tokens[AGENT.id])
    subscription = f"sub-{uuid.uuid4().hex[:6]}"
    opened = agent.submit("StartSubscription", subscription, start(1_000_000).model_dump(), on_behalf_of="cust-1")
    agent.wait(opened.command_id, until="executed", timeout_s=90)

    refund_id = agent.submit("IssueRefund", subscription, refund(500_000).model_dump(),
                             on_behalf_of="cust-1").command_id
    agent.wait(refund_id, until="pending_approval", timeout_s=60)
    seen: list[dict[str, Any]] = []
    follower = threading.Thread(target=_follow, args=(url, tokens[AGENT.id], refund_id, seen))
    follower.start()

    provider.set_faults(Faults(latency_ms=1500))  # the charge takes long enough to be seen running
    barrier = threading.Barrier(len(ADMINS))
    approved: dict[str, uuid.UUID] = {}

    def approve(admin: Actor) -> None:
        with KeelClient(url, tokens[admin.id]) as client:
            barrier.wait()  # both approvals leave at the same moment
            approved[admin.id] = client.submit("ApproveCommand", subscription,
                                               {"command_id": str(refund_id)}).command_id

    racers = [threading.Thread(target=approve, args=(admin,)) for admin in ADMINS]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(30)
    final = agent.wait(refund_id, until="succeeded", timeout_s=120)
    follower.join(30)

    decided = {admin: _decided(url, tokens[admin], approval) for admin, approval in approved.items()}
    assert sorted(r["status"] for r in decided.values()) == ["executed", "rejected"], decided
    assert [r["reason_code"] for r in decided.values() if r["status"] == "rejected"] == ["not_pending"]

    [issued] = [e for e in final.events if e.type == "RefundIssued"]
    [effect] = final.effects
    assert (effect.effect_id, effect.state, effect.provider) == (issued.event_id, "succeeded", "payments")
    performed = provider.performed()
    assert list(performed) == [idempotency_key(issued.event_id)], "the provider must be charged exactly once"
    assert performed[idempotency_key(issued.event_id)].count == 1
    assert performed[idempotency_key(issued.event_id)].body["amount_cents"] == 500_000

    states = [(r["status"], r["summary"]["state"], r["summary"].get("reason")) for r in seen]
    assert states[0] == ("pending_approval", "waiting", "approval"), states
    assert ("executed", "running", None) in states, states
    assert states[-1][:2] == ("executed", "succeeded"), states
    assert states.index(("executed", "running", None)) < len(states) - 1


def _decided(url: str, token: str, command_id: uuid.UUID) -> dict[str, Any]:
    """The command's record once the processor decided it."""
    deadline = time.monotonic() + 60
    while True:
        answer = httpx.get(f"{url}/v1/commands/{command_id}", headers=_bearer(token), timeout=10).json()
        if answer["status"] in ("executed", "rejected") or time.monotonic() > deadline:
            return dict(answer)
        time.sleep(0.2)


def _follow(url: str, token: str, command_id: uuid.UUID, seen: list[dict[str, Any]]) -> None:
    """Collect every ``status`` event of the command's SSE stream until it ends."""
    with httpx.stream("GET", f"{url}/v1/commands/{command_id}/stream", params={"timeout_s": 120},
                      headers=_bearer(token), timeout=130) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                seen.append(json.loads(line[5:]))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
