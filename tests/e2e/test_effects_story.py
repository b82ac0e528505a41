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
from keel.domain.commands import SetPolicy
from keel.domain.effects import idempotency_key
from keel.domain.envelope import Actor, ActorKind
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.sdk.client import KeelClient
from keel.security.keys import KeyStore
from keel.testing.provider import Faults, ProviderSimulator
from tests.broker_faults import free_port
from tests.helpers import command, refund, send, start
from tests.processes import KeelProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
ADMINS = (Actor(kind=ActorKind.HUMAN, id="ann.admin"), Actor(kind=ActorKind.HUMAN, id="bo.admin"))
POLICY = {"version": "story-1", "roles": {"support-agent": ["StartSubscription", "IssueRefund"], "admin": ["*"]},
          "grants": {"agent:support-bot": ["support-agent"], "human:ann.admin": ["admin"],
                     "human:bo.admin": ["admin"]},
          "rules": [{"name": "refunds-over-1000-need-an-admin", "decision": "approve",
                     "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}}}]}


@pytest.fixture
def platform(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, dict[str, str], ProviderSimulator]]:
    """The gateway's URL, an API key per actor, and the provider, with every service running."""
    dsn = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    db = open_database(dsn)
    OutboxStore(db).migrate()
    keys = KeyStore(db)
    keys.create_tenant("acme")
    tokens = {actor.id: keys.create_key("acme", actor, frozenset())[1] for actor in (AGENT, *ADMINS)}
    db.close()
    port = free_port()
    with ProviderSimulator() as provider:
        env = {"KEEL_OUTBOX_DSN": dsn, "KEEL_GATEWAY_PORT": str(port), "KEEL_GATEWAY_KEY_CACHE_S": "0",
               "SUPPORT_DESK_PAYMENTS_URL": provider.url, "SUPPORT_DESK_EMAIL_URL": provider.url}
        services = [KeelProcess(args, settings, tmp_path / f"{name}.log", **env) for name, args in (
            ("gateway", ["gateway"]), ("relay", ["relay"]),
            ("processor", ["process", "--no-supervise", "--instance", "p1"]),
            ("effects", ["effects", "run", "--no-supervise", "--instance", "e1"]))]
        send(settings, command("acme", "controls", SetPolicy(document=json.dumps(POLICY)), actor=SYSTEM_ACTOR))
        for service in services:
            service.start()
        url = f"http://127.0.0.1:{port}"
        try:
            _until(lambda: _answers(url), "the gateway answering /healthz")
            yield url, tokens, provider
        finally:
            for service in services:
                service.stop(grace_s=10)


def test_a_big_refund_approved_twice_at_once_charges_the_provider_once(
        settings: Settings, platform: tuple[str, dict[str, str], ProviderSimulator]) -> None:
    url, tokens, provider = platform
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


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _until(condition: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
