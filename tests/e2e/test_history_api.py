"""History, audit and undo over HTTP, against every real process (gateway, relay, processor, effect
worker, chainer, provider simulator): a parked $5,000 refund is approved, paid, undone; its timeline,
its subject's trail and the tenant's verify status come from the real audit chain; approvers read
parked payloads per their role; another tenant's key sees and changes nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import httpx
import pytest

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind
from keel.domain.personal import SEALED
from keel.outbox.db import open_database
from keel.security.keys import KeyStore
from tests.conftest import own_topics
from tests.platform import TENANT, running_platform

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
ADMIN = Actor(kind=ActorKind.HUMAN, id="ann.admin")
POLICY = {"version": "history-1",
          "roles": {"support-agent": ["StartSubscription", "IssueRefund", "SendEmail"], "admin": ["*"]},
          "grants": {"agent:support-bot": ["support-agent"], "human:ann.admin": ["admin"]},
          "rules": [{"name": "refunds-over-1000-need-an-admin", "decision": "approve",
                     "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}}},
                    {"name": "emails-need-an-admin", "decision": "approve",
                     "match": {"command_types": ["SendEmail"]}}]}
CUSTOMER = "cust-h1"


@dataclass
class Api:
    url: str
    tokens: dict[str, str]

    def call(self, who: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", headers={"Authorization": f"Bearer {self.tokens[who]}"},
                             timeout=30, **kwargs)

    def ok(self, who: str, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.call(who, method, path, **kwargs)
        assert answer.status_code in (200, 202), f"{method} {path}: {answer.status_code} {answer.text}"
        return answer.json()

    def submit(self, who: str, type_: str, aggregate: str, payload: dict[str, Any]) -> str:
        body = {"type": type_, "aggregate_id": aggregate, "payload": payload, "on_behalf_of": CUSTOMER}
        return str(self.ok(who, "POST", "/v1/commands", json=body)["command_id"])

    def until(self, who: str, path: str, done: Any, what: str, timeout_s: float = 90) -> Any:
        deadline = time.monotonic() + timeout_s
        while not done(found := self.ok(who, "GET", path)):
            assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {found}"
            time.sleep(0.3)
        return found


@pytest.fixture(scope="module")
def api(broker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("history")
    with own_topics(broker_settings) as settings, running_platform(
            settings, tmp, (AGENT, ADMIN), POLICY,
            extra=lambda _gateway: {"chainer": ["chain", "--no-supervise", "--instance", "h1"]}) as platform:
        keys = KeyStore(open_database(f"sqlite:///{tmp / 'outbox.sqlite3'}"))
        keys.create_tenant("globex")
        tokens = {**platform.tokens,
                  "auditor": keys.create_key(TENANT, Actor(kind=ActorKind.HUMAN, id="aud"), frozenset({"auditor"}))[1],
                  "reader": keys.create_key(TENANT, Actor(kind=ActorKind.HUMAN, id="pia"),
                                            frozenset({"personal_data"}))[1],
                  "globex": keys.create_key("globex", ADMIN, frozenset({"auditor", "personal_data"}))[1]}
        yield Api(platform.gateway, tokens)


def _status(api: Api, command_id: str, *states: str) -> dict[str, Any]:
    return cast(dict[str, Any], api.until(AGENT.id, f"/v1/commands/{command_id}",
                                          lambda r: r["status"] in states or r["summary"]["state"] in states,
                                          f"{command_id} in {states}"))


def test_a_refund_approved_paid_and_undone_tells_its_whole_story(api: Api) -> None:
    subscription = f"sub-{uuid.uuid4().hex[:6]}"
    opened = api.submit(AGENT.id, "StartSubscription", subscription,
                        {"customer_id": CUSTOMER, "plan": "pro", "monthly_price_cents": 1_000_000, "currency": "EUR"})
    _status(api, opened, "executed")
    refund = api.submit(AGENT.id, "IssueRefund", subscription,
                        {"amount_cents": 500_000, "currency": "EUR", "reason": "goodwill"})
    _status(api, refund, "pending_approval")

    waiting = api.ok(ADMIN.id, "GET", "/v1/approvals")["approvals"]
    parked = next(a for a in waiting if a["command_id"] == refund)
    assert parked["payload"]["amount_cents"] == 500_000 and parked["policy_rule"] == "refunds-over-1000-need-an-admin"
    assert api.ok("globex", "GET", "/v1/approvals")["approvals"] == []
    assert api.call("globex", "POST", f"/v1/approvals/{refund}/approve", json={}).status_code == 404
    assert api.call("globex", "GET", f"/v1/commands/{refund}/timeline").status_code == 404

    api.ok(ADMIN.id, "POST", f"/v1/approvals/{refund}/approve", json={"comment": "checked the ticket"})
    _status(api, refund, "succeeded")

    assert api.call("globex", "POST", f"/v1/commands/{refund}/undo", json={"reason": "no"}).status_code == 404
    irreversible = api.call(ADMIN.id, "POST", f"/v1/commands/{opened}/undo", json={"reason": "try"})
    assert irreversible.status_code == 404 or irreversible.json()["error"]["code"] == "irreversible", irreversible.text
    undone = api.ok(ADMIN.id, "POST", f"/v1/commands/{refund}/undo", json={"reason": "customer kept the goods"})
    _status(api, str(undone["command_id"]), "executed")

    story = api.until(AGENT.id, f"/v1/commands/{refund}/timeline",
                      lambda t: any(e["undoes"] for e in t["entries"]) and any(
                          e["type"] == "EffectSucceeded" for e in t["entries"]),
                      "the undo and the effect in the chained timeline")["entries"]
    types = [entry["type"] for entry in story]
    assert types.index("ApprovalRequested") < types.index("ApprovalGranted") < types.index("RefundIssued")
    granted = story[types.index("ApprovalGranted")]
    assert granted["actor"] == f"human:{ADMIN.id}" and granted["payload"]["comment"] == "checked the ticket"
    asked = story[types.index("ApprovalRequested")]
    assert asked["actor"] == f"agent:{AGENT.id}" and asked["on_behalf_of"] == CUSTOMER
    assert asked["authority"]["policy_rule"] == "refunds-over-1000-need-an-admin"
    reversal = next(entry for entry in story if entry["undoes"])
    assert reversal["actor"] == f"human:{ADMIN.id}" and reversal["names"].get("reverses") == refund
    assert [e["seq"] for e in story] == sorted(e["seq"] for e in story)

    assert api.call(AGENT.id, "GET", f"/v1/subjects/{CUSTOMER}/trail").json()["error"]["code"] == "forbidden"
    trail = api.ok("auditor", "GET", f"/v1/subjects/{CUSTOMER}/trail")["entries"]
    assert {e["type"] for e in story} <= {e["type"] for e in trail}
    assert api.ok("globex", "GET", f"/v1/subjects/{CUSTOMER}/trail")["entries"] == []

    verified = api.ok(ADMIN.id, "GET", "/v1/audit/status")
    assert verified["verdict"] == "ok" and verified["records"] >= len(story), verified
    assert api.ok("globex", "GET", "/v1/audit/status")["verdict"] == "empty"


def test_parked_personal_values_read_per_role(api: Api) -> None:
    subscription = f"sub-{uuid.uuid4().hex[:6]}"
    mail = api.submit(AGENT.id, "SendEmail", subscription,
                      {"to_address": "pat@example.com", "template": "sorry", "body": "Dear Pat"})
    _status(api, mail, "pending_approval")

    def shown(who: str) -> dict[str, Any]:
        listed = api.ok(who, "GET", "/v1/approvals")["approvals"]
        return dict(next(a for a in listed if a["command_id"] == mail)["payload"])

    assert shown(ADMIN.id) == {"to_address": SEALED, "template": "sorry", "body": SEALED}
    assert shown("reader") == {"to_address": "pat@example.com", "template": "sorry", "body": "Dear Pat"}
    read = api.until("auditor", f"/v1/commands/{mail}/timeline",
                     lambda t: any(e["type"] == "PersonalDataRead" for e in t["entries"]),
                     "the plaintext read in the audit chain")["entries"]
    receipt = next(e for e in read if e["type"] == "PersonalDataRead")
    assert receipt["actor"] == "human:pia" and set(receipt["payload"]["fields"]) == {"to_address", "body"}


def test_unknown_commands_and_bad_bodies_are_refused_plainly(api: Api) -> None:
    nobody = uuid.uuid4()
    assert api.call(ADMIN.id, "GET", f"/v1/commands/{nobody}/timeline").json()["error"]["code"] == "not_found"
    assert api.call(ADMIN.id, "POST", f"/v1/commands/{nobody}/undo", json={"reason": "x"}).status_code == 404
    assert api.call(ADMIN.id, "POST", f"/v1/commands/{nobody}/undo", json={"reason": ""}).status_code == 422
    assert api.call(ADMIN.id, "POST", f"/v1/commands/{nobody}/undo", json={"reason": "x" * 1001}).status_code == 422
    assert httpx.get(f"{api.url}/v1/audit/status", timeout=10).json()["error"]["code"] == "missing_key"
