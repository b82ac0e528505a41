"""``GET /v1/actions`` and ``POST /v1/explain`` through a real gateway (uvicorn, SQLite outbox)
following the real controls topic, checked against what the processor then decides."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind, Envelope
from keel.domain.events import ApprovalKind, ApprovalRequested, CommandRejected
from keel.domain.governance.controls import default_policy
from keel.domain.messages import SetKillSwitch, SwitchScope
from keel.gateway.actions import Explanation
from keel.gateway.app import create_app
from keel.gateway.settings import IngressSettings
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.outbox.store import OutboxStore
from keel.processor.worker import CommandProcessor
from keel.client import KeelClient, RequestRefused
from support_desk.messages import IssueRefund, SendEmail
from tests.platform import put_in_force, serving, sqlite_outbox
from tests.helpers import AGENT, command, events, send, start

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ANN = Actor(kind=ActorKind.HUMAN, id="ann")
POLICY = {"version": "acme-7", "roles": {"agent": ["IssueRefund", "StartSubscription"], "admin": ["*"]},
          "grants": {"agent:support-bot": ["agent"], "human:ann": ["admin"]},
          "rules": [{"name": "huge", "decision": "deny", "match": {"payload": {"amount_cents": {"gt": 500_000}}}},
                    {"name": "big", "decision": "approve", "match": {"payload": {"amount_cents": {"gt": 100_000}}}},
                    {"name": "unsure", "decision": "confirm", "match": {"confidence_below": 0.5}}]}


@dataclass
class Gateway:
    url: str
    store: OutboxStore
    tokens: dict[str, str]

    def client(self, who: str) -> KeelClient:
        return KeelClient(self.url, self.tokens[who])


@pytest.fixture
def processor(settings: Settings) -> Iterator[CommandProcessor]:
    worker = CommandProcessor(settings, instance_id="actions")
    yield worker
    worker.close()


@pytest.fixture
def gateway(settings: Settings, processor: CommandProcessor, tmp_path: Path) -> Iterator[Gateway]:
    """acme's policy published through the processor, then a gateway on a free port."""
    put_in_force(settings, processor, POLICY)
    outbox = sqlite_outbox(tmp_path, "acme", "globex")
    dsn, store, keys = outbox.dsn, outbox.store, outbox.keys
    tokens = {"acme-bot": keys.create_key("acme", AGENT)[1], "acme-ann": keys.create_key("acme", ANN)[1],
              "globex-bot": keys.create_key("globex", AGENT)[1]}
    app = create_app(settings.model_copy(update={"data_dir": tmp_path}),
                     IngressSettings(outbox_dsn=dsn, gateway_key_cache_s=0))
    with serving(app) as url:
        yield Gateway(url, store, tokens)
    outbox.close()


def test_the_actions_a_key_is_offered_follow_its_tenants_policy(gateway: Gateway) -> None:
    with gateway.client("acme-bot") as bot, gateway.client("acme-ann") as ann, \
            gateway.client("globex-bot") as other:
        assert {a.type for a in bot.actions()} == {"IssueRefund", "StartSubscription"}
        assert {"IssueRefund", "SendEmail", "CancelSubscription"} <= {a.type for a in ann.actions()}
        assert {"IssueRefund", "SendEmail", "CancelSubscription"} <= {a.type for a in other.actions()}  # builtin
        [issue] = [a for a in bot.actions() if a.type == "IssueRefund"]
        assert issue.domain == "support_desk" and "amount_cents" in issue.json_schema["properties"]
    answer = httpx.get(f"{gateway.url}/v1/actions", headers={"Authorization": f"Bearer {gateway.tokens['acme-bot']}"})
    assert set(answer.json()["actions"][0]) == {"type", "domain", "aggregate", "description", "id_pattern", "schema"}


def test_explain_foretells_the_processors_decision_and_writes_nothing(
        settings: Settings, gateway: Gateway, processor: CommandProcessor) -> None:
    sent = [command("acme", "sub-a", start()),
            command("acme", "sub-a", IssueRefund(amount_cents=200_000, currency="EUR", reason="x")),
            command("acme", "sub-a", IssueRefund(amount_cents=900_000, currency="EUR", reason="x")),
            command("acme", "sub-a", IssueRefund(amount_cents=50, currency="EUR", reason="x", confidence=0.2),
                    on_behalf_of=None),
            command("acme", "sub-a", SendEmail(to_address="c@example.com", template="hi"))]
    with gateway.client("acme-bot") as bot:
        told = [explained(bot, c) for c in sent]
    assert [(t.outcome, t.rule, t.code) for t in told] == [
        ("allow", "default", None), ("approve", "big", None), ("deny", "huge", "policy_denied"),
        ("refused", "unsure", "no_subject"), ("refused", None, "no_role")]
    assert {t.policy_version for t in told} == {"acme-7"}
    assert gateway.store.unsent(10) == []  # nothing reached the outbox
    assert len(list(read_to_end(settings, topic_name(settings, Topic.COMMANDS)))) == 1  # the SetPolicy alone

    send(settings, *sent)
    processor.run_until_caught_up()
    first: dict[object, object] = {}
    for event in events(settings):
        first.setdefault(event.causation_id, event.payload)
    assert [as_outcome(first[c.id]) for c in sent] == [(t.outcome, t.code) for t in told]


def test_another_tenants_policy_does_not_leak(gateway: Gateway) -> None:
    with gateway.client("globex-bot") as other:
        told = explained(other, command("globex", "sub-g", IssueRefund(amount_cents=900_000, currency="EUR",
                                                                       reason="x")))
    assert told.policy_version == default_policy().version
    assert (told.outcome, told.rule) == ("approve", "refunds-over-1000-need-an-admin")


def test_explain_follows_a_kill_switch_thrown_after_start(
        settings: Settings, gateway: Gateway, processor: CommandProcessor) -> None:
    switch = SetKillSwitch(scope=SwitchScope.AGENT, target="support-bot", engaged=True, reason="runaway")
    send(settings, command("acme", "controls", switch, actor=ANN))
    processor.run_until_caught_up()
    deadline = time.monotonic() + 15
    with gateway.client("acme-bot") as bot:
        while (told := explained(bot, command("acme", "sub-a", start()))).outcome != "refused":
            assert time.monotonic() < deadline, f"the switch never reached the gateway: {told}"
            time.sleep(0.2)
    assert told.code == "kill_switch"


def test_explain_refuses_bodies_as_submit_does(gateway: Gateway) -> None:
    with gateway.client("acme-bot") as bot:
        for body, code, status in (({"payload": {"amount_cents": -1}}, "schema_violation", 422),
                                   ({"tenant_id": "globex"}, "wrong_tenant", 403)):
            with pytest.raises(RequestRefused) as refused:
                bot.explain("IssueRefund", "sub-a", {"amount_cents": 5, "currency": "EUR", "reason": "x",
                                                     **cast(dict[str, Any], body.get("payload", {}))},
                            **{k: v for k, v in body.items() if k != "payload"})
            assert (refused.value.code, refused.value.status) == (code, status)
        with pytest.raises(RequestRefused) as refused:
            bot.explain("SetPolicy", "controls", {"document": "{}"})
        assert refused.value.code == "not_explainable"
    assert gateway.store.rejections("acme") == []  # a question is no attack on isolation


def test_the_openapi_document_types_every_command_body(gateway: Gateway) -> None:
    document = httpx.get(f"{gateway.url}/openapi.json").json()
    schemas, paths = document["components"]["schemas"], document["paths"]
    for path, union in (("/v1/commands", "AnyCommand"), ("/v1/explain", "DomainCommand")):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{union}"}
    mapping = schemas["AnyCommand"]["discriminator"]["mapping"]
    assert schemas["AnyCommand"]["discriminator"]["propertyName"] == "type" and "SetPolicy" in mapping
    assert "SetPolicy" not in schemas["DomainCommand"]["discriminator"]["mapping"]
    refund = schemas[mapping["IssueRefund"].rsplit("/", 1)[1]]
    assert "amount_cents" in schemas[refund["properties"]["payload"]["$ref"].rsplit("/", 1)[1]]["properties"]
    assert "404" in paths["/v1/commands/{command_id}"]["get"]["responses"]
    assert set(paths["/v1/explain"]["post"]["responses"]) >= {"200", "401", "403", "413", "422"}


def explained(client: KeelClient, sent: Envelope) -> Explanation:
    envelope: dict[str, Any] = {"id": str(sent.id)}
    if sent.on_behalf_of:
        envelope["on_behalf_of"] = sent.on_behalf_of
    return client.explain(sent.type, sent.aggregate_id, sent.payload.model_dump(mode="json"), **envelope)


def as_outcome(first: object) -> tuple[str, str | None]:
    """The processor's first event for a command, in explain's terms."""
    if isinstance(first, CommandRejected):
        return ("deny" if first.code == "policy_denied" else "refused"), first.code
    if isinstance(first, ApprovalRequested):
        return {ApprovalKind.APPROVAL: "approve", ApprovalKind.CONFIRMATION: "confirm"}[first.approval_kind], None
    return "allow", None

