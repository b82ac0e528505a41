"""``/v1/approvals`` through a real gateway (uvicorn, SQLite outbox): commands go to Kafka by the
relay, the processor decides them, the status tracker brings the outcomes back to the outbox."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind
from keel.gateway.app import create_app
from keel.gateway.settings import IngressSettings
from keel.outbox.models import TERMINAL, CommandRecord, CommandStatus
from keel.outbox.store import OutboxStore
from keel.processor.worker import CommandProcessor
from keel.relay.relay import Relay
from keel.relay.tracker import StatusTracker
from keel.client import KeelClient, RequestRefused
from tests.platform import put_in_force, serving, sqlite_outbox
from tests.helpers import AGENT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ANN = Actor(kind=ActorKind.HUMAN, id="ann")
POLICY = {"version": "acme-8", "roles": {"agent": ["IssueRefund", "StartSubscription"], "admin": ["*"]},
          "grants": {"agent:support-bot": ["agent"], "human:ann": ["admin"]},
          "rules": [{"name": "big", "decision": "approve", "match": {"payload": {"amount_cents": {"gt": 100_000}}}}]}
SUBJECT: dict[str, Any] = {"on_behalf_of": "cust-1"}


@dataclass
class Platform:
    url: str
    store: OutboxStore
    tokens: dict[str, str]
    pump: Callable[[], None]

    def client(self, who: str) -> KeelClient:
        return KeelClient(self.url, self.tokens[who])

    def until(self, who: str, command_id: uuid.UUID, status: CommandStatus) -> CommandRecord:
        """The command's record once it has ``status``, moving commands and outcomes meanwhile."""
        deadline = time.monotonic() + 30
        with self.client(who) as client:
            while (record := client.status(command_id)).status is not status:
                assert record.status not in TERMINAL, f"{command_id} ended {record.status}: {record.reason}"
                assert time.monotonic() < deadline, f"{command_id} stayed {record.status}, not {status}"
                self.pump()
        return record


@pytest.fixture
def platform(settings: Settings, tmp_path: Path) -> Iterator[Platform]:
    """acme's policy in force, a gateway on a free port, and relay, processor and tracker to pump."""
    processor = CommandProcessor(settings, instance_id="approvals")
    put_in_force(settings, processor, POLICY)
    outbox = sqlite_outbox(tmp_path, "acme", "globex")
    dsn, store, keys = outbox.dsn, outbox.store, outbox.keys
    tokens = {"acme-bot": keys.create_key("acme", AGENT)[1], "acme-ann": keys.create_key("acme", ANN)[1],
              "globex-ann": keys.create_key("globex", ANN)[1]}
    ingress = IngressSettings(outbox_dsn=dsn, gateway_key_cache_s=0)
    relay, tracker = Relay(store, settings, ingress), StatusTracker(store, settings)

    def pump() -> None:
        relay.run_once()
        processor.run_until_caught_up()
        tracker.run_once(0.2)

    with serving(create_app(settings.model_copy(update={"data_dir": tmp_path}), ingress)) as url:
        yield Platform(url, store, tokens, pump)
    relay.close()
    tracker.close()
    processor.close()
    outbox.close()


def parked_refund(platform: Platform, amount: int) -> uuid.UUID:
    """A refund on a new subscription, parked by the rule ``big``."""
    aggregate = f"sub-{uuid.uuid4().hex[:8]}"
    with platform.client("acme-bot") as bot:
        bot.submit("StartSubscription", aggregate, {"customer_id": "cust-1", "plan": "pro",
                                                    "monthly_price_cents": 500_000, "currency": "EUR"}, **SUBJECT)
        refund = bot.submit("IssueRefund", aggregate, {"amount_cents": amount, "currency": "EUR",
                                                       "reason": "outage", "confidence": 0.7}, **SUBJECT)
    platform.until("acme-bot", refund.command_id, CommandStatus.PENDING_APPROVAL)
    return refund.command_id


def test_an_approver_lists_and_approves_a_parked_refund_once(platform: Platform) -> None:
    refund = parked_refund(platform, 200_000)
    with platform.client("acme-ann") as ann, platform.client("globex-ann") as other:
        [listed] = ann.approvals()
        assert other.approvals() == []
        assert (listed.command_id, listed.command_type, listed.policy_rule, listed.approval_kind) == (
            refund, "IssueRefund", "big", "approval")
        assert (listed.actor, listed.on_behalf_of, listed.confidence, listed.policy_version) == (
            AGENT, "cust-1", 0.7, "acme-8")
        assert listed.aggregate_id.startswith("sub-") and listed.expires_at.timestamp() > time.time()

        approval = ann.approve(refund, comment="known outage")
        assert approval.status_url == f"/v1/commands/{approval.command_id}"
        platform.until("acme-ann", approval.command_id, CommandStatus.EXECUTED)
        platform.until("acme-bot", refund, CommandStatus.EXECUTED)
        assert ann.approvals() == []

        again = platform.until("acme-ann", ann.approve(refund).command_id, CommandStatus.REJECTED)
        assert again.reason_code == "not_pending"


def test_a_rejection_rejects_the_parked_command_and_an_agent_cannot_decide(platform: Platform) -> None:
    refund = parked_refund(platform, 300_000)
    with platform.client("acme-bot") as bot, platform.client("acme-ann") as ann:
        refused = platform.until("acme-bot", bot.approve(refund).command_id, CommandStatus.REJECTED)
        assert refused.reason_code == "self_approval"
        [still] = ann.approvals()
        assert still.command_id == refund

        rejection = ann.reject(refund, "not during an outage")
        platform.until("acme-ann", rejection.command_id, CommandStatus.EXECUTED)
        record = platform.until("acme-bot", refund, CommandStatus.REJECTED)
        assert "not during an outage" in (record.reason or "")
        assert ann.approvals() == []


def test_unknown_and_other_tenants_ids_are_404_and_bodies_are_checked(platform: Platform) -> None:
    refund = parked_refund(platform, 200_000)
    with platform.client("acme-bot") as bot:
        plain = bot.submit("IssueRefund", "sub-x", {"amount_cents": 5, "currency": "EUR", "reason": "x"},
                           **SUBJECT).command_id  # never asked for a decision
    with platform.client("globex-ann") as other, platform.client("acme-ann") as ann:
        decide: Callable[[], object]
        for client, command_id in ((other, refund), (ann, uuid.uuid4()), (ann, plain)):
            for decide in (lambda: client.approve(command_id), lambda: client.reject(command_id, "no")):
                with pytest.raises(RequestRefused) as refused:
                    decide()
                assert (refused.value.status, refused.value.code) == (404, "not_found")
    headers = {"Authorization": f"Bearer {platform.tokens['acme-ann']}"}
    for path, body in (("approve", {"comment": "x" * 1001}), ("reject", {"reason": ""}), ("reject", {})):
        answer = httpx.post(f"{platform.url}/v1/approvals/{refund}/{path}", json=body, headers=headers)
        assert (answer.status_code, answer.json()["error"]["code"]) == (422, "schema_violation")
    assert httpx.get(f"{platform.url}/v1/approvals").status_code == 401
    assert platform.store.rejections("globex") == []
    with platform.client("acme-ann") as ann:
        assert [p.command_id for p in ann.approvals()] == [refund]  # nothing was decided
    decision, url = str(uuid.uuid4()), f"{platform.url}/v1/approvals/{refund}/approve"
    first, again, changed = (httpx.post(url, json={"comment": comment, "id": decision}, headers=headers)
                             for comment in ("ok", "ok", "changed"))
    assert (first.status_code, first.json()["command_id"], first.json()["replayed"]) == (202, decision, False)
    assert (again.status_code, again.json()["replayed"]) == (202, True)
    assert (changed.status_code, changed.json()["error"]["code"]) == (409, "idempotency_conflict")


def test_the_openapi_document_lists_the_routes_and_their_errors(platform: Platform) -> None:
    paths = httpx.get(f"{platform.url}/openapi.json").json()["paths"]
    assert set(paths["/v1/approvals"]["get"]["responses"]) >= {"200", "401", "422", "503"}
    for decision in ("approve", "reject"):
        responses = paths[f"/v1/approvals/{{command_id}}/{decision}"]["post"]["responses"]
        assert set(responses) >= {"202", "401", "404", "409", "422", "503"}
        assert "not_found" in responses["404"]["description"]
