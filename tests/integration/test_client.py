"""``keel.client`` against the running gateway: typed answers and refusals, sync and async, and tools.

Every part is a real process on the real broker, as in ``tests.platform``: the gateway, the
relay, the processor, an effect worker, the provider simulator and the projector (which
serves chDB to the gateway's ``GET /v1/query``). An agent, an admin and an analyst act
with their own API keys, through the client only, and the documented example
(``examples/agent_tool``) plays its script against the same platform.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pyarrow  # type: ignore[import-untyped]
import pyarrow.ipc  # type: ignore[import-untyped]
import pytest
from confluent_kafka.admin import AdminClient

from keel.bootstrap import ensure_local_keys
from keel.client import AsyncKeelClient, EndedOtherwise, KeelClient, RequestRefused, async_tools, core, tools
from keel.client.models import CommandStatus, EffectState
from keel.config import PROJECT_ROOT, Settings
from keel.domain.envelope import Actor, ActorKind
from keel.errors import KeelError
from keel.kafka.clients import admin_config
from keel.kafka.topics import apply_topics, declared_topics
from keel.outbox.db import open_database
from keel.security.keys import KeyStore
from tests.platform import TENANT, running_platform, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
ADMIN = Actor(kind=ActorKind.HUMAN, id="ann.admin")
ANALYST = Actor(kind=ActorKind.HUMAN, id="ana.lyst")
RULE = "refunds-over-1000-need-an-admin"
POLICY = {"version": "client-1",
          "roles": {"support-agent": ["StartSubscription", "IssueRefund", "CancelSubscription"], "admin": ["*"]},
          "grants": {"agent:support-bot": ["support-agent"], "human:ann.admin": ["admin"]},
          "rules": [{"name": RULE, "decision": "approve",
                     "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}}},
                    {"name": "agents-never-cancel", "decision": "deny",
                     "match": {"command_types": ["CancelSubscription"]}}]}
START = {"customer_id": "cust-1", "plan": "pro", "monthly_price_cents": 1_000_000, "currency": "EUR"}
SUBJECT: dict[str, Any] = {"on_behalf_of": "cust-1"}


def refund(amount_cents: int) -> dict[str, Any]:
    return {"amount_cents": amount_cents, "currency": "EUR", "reason": "outage"}


@dataclass(frozen=True)
class Platform:
    gateway: str
    tokens: dict[str, str]
    """Actor id -> API key: the agent, the admin and the analyst (role analyst)."""

    def client(self, actor: Actor) -> KeelClient:
        return KeelClient(self.gateway, self.tokens[actor.id])

    def async_client(self, actor: Actor) -> AsyncKeelClient:
        return AsyncKeelClient(self.gateway, self.tokens[actor.id])


@pytest.fixture(scope="module")
def platform(broker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """Every service and the projector, started once for the module, on its own topics, data dir and chDB."""
    tmp = tmp_path_factory.mktemp("client")
    suffix = uuid.uuid4().hex[:10]
    settings = broker_settings.model_copy(update={
        "topic_prefix": f"test-client-{suffix}", "clickhouse_database": f"keel_{suffix}", "topic_partitions": 3,
        "data_dir": tmp, "clickhouse_dsn": f"chdb://{tmp / 'chdb'}"})
    ensure_local_keys(settings)  # personal fields are sealed with the module's own keys
    admin = AdminClient(admin_config(settings))
    topics = declared_topics(settings)
    apply_topics(admin, topics)
    try:
        with running_platform(settings, tmp, (AGENT, ADMIN), POLICY,
                              extra=lambda gateway: {"project": ["project", "--follow"]}) as running:
            db = open_database(f"sqlite:///{tmp / 'outbox.sqlite3'}")
            analyst = KeyStore(db).create_key(TENANT, ANALYST, frozenset({"analyst"}))[1]
            db.close()
            platform = Platform(running.gateway, {**running.tokens, ANALYST.id: analyst})
            with platform.client(AGENT) as agent:  # the first command waits for the processor to join its group
                agent.wait(agent.submit("StartSubscription", "sub-warm-up", START, **SUBJECT).command_id,
                           "executed", timeout_s=90)
            yield platform
    finally:
        admin.delete_topics([topic.name for topic in topics], operation_timeout=30)


def subscription(agent: KeelClient) -> str:
    """A new subscription of cust-1's, started and executed."""
    name = f"sub-{uuid.uuid4().hex[:8]}"
    started = agent.wait(agent.submit("StartSubscription", name, START, **SUBJECT).command_id, "succeeded")
    assert started.status is CommandStatus.EXECUTED
    return name


def test_actions_and_explain_answer_the_gateways_own_models(platform: Platform) -> None:
    with platform.client(AGENT) as agent:
        actions = {action.type: action for action in agent.actions()}
        assert set(actions) == {"StartSubscription", "IssueRefund", "CancelSubscription"}
        assert actions["IssueRefund"].json_schema["type"] == "object"
        assert "amount_cents" in actions["IssueRefund"].json_schema["properties"]

        big = agent.explain("IssueRefund", "sub-any", refund(500_000), **SUBJECT)
        assert (big.outcome, big.rule, big.code, big.policy_version) == ("approve", RULE, None, "client-1")
        assert "admin" in big.reason
        cancel = agent.explain("CancelSubscription", "sub-any", {"reason": "asked"}, **SUBJECT)
        assert (cancel.outcome, cancel.code) == ("deny", "policy_denied")


def test_submit_then_wait_follows_the_stream_until_executed_with_its_effects(platform: Platform) -> None:
    with platform.client(AGENT) as agent:
        name = subscription(agent)
        accepted = agent.submit("IssueRefund", name, refund(1_000), **SUBJECT)
        assert (accepted.status, accepted.replayed) == (CommandStatus.ACCEPTED, False)

        settled = agent.wait(accepted.command_id)  # by default: until settled
        assert (settled.status, settled.summary.state, settled.summary.done) == (
            CommandStatus.EXECUTED, EffectState.SUCCEEDED, True)
        assert [(e.provider, e.state) for e in settled.effects] == [("payments", EffectState.SUCCEEDED)]
        assert "RefundIssued" in [event.type for event in settled.events]
        assert agent.status(accepted.command_id) == settled

        again = agent.submit("IssueRefund", name, refund(1_000), command_id=accepted.command_id, **SUBJECT)
        assert (again.command_id, again.replayed) == (accepted.command_id, True)


def test_refusals_are_typed_errors_carrying_the_gateways_code_and_field(platform: Platform) -> None:
    with platform.client(AGENT) as agent:
        name = subscription(agent)
        with pytest.raises(RequestRefused) as malformed:
            agent.submit("IssueRefund", name, {**refund(1_000), "amount_cents": "lots"}, **SUBJECT)
        assert (malformed.value.status, malformed.value.code, malformed.value.field) == (
            422, "schema_violation", "payload.amount_cents")
        assert malformed.value.error.model_dump() == {"code": "schema_violation", "field": "payload.amount_cents",
                                                     "message": malformed.value.message}
        assert "POST /v1/commands answered 422" in str(malformed.value)
        with pytest.raises(RequestRefused) as unknown:
            agent.submit("NoSuchAction", name, {})
        assert unknown.value.code == "unknown_type"
        with pytest.raises(RequestRefused) as own:
            agent.explain("SetPolicy", "controls", {"document": "{}"})
        assert own.value.code == "not_explainable"
        with pytest.raises(RequestRefused) as missing:
            agent.status(uuid.uuid4())
        assert (missing.value.status, missing.value.code) == (404, "not_found")

        denied = agent.submit("CancelSubscription", name, {"reason": "asked"}, **SUBJECT).command_id
        with pytest.raises(EndedOtherwise) as ended:
            agent.wait(denied, "executed")
        assert (ended.value.record.status, ended.value.record.reason_code) == (CommandStatus.REJECTED, "policy_denied")
    with KeelClient(platform.gateway, "keel_not-a-key") as stranger, pytest.raises(RequestRefused) as invalid:
        stranger.actions()
    assert (invalid.value.status, invalid.value.code) == (401, "invalid_key")


def test_tools_run_refuse_and_park_actions_and_an_admin_approves_through_the_client(platform: Platform) -> None:
    with platform.client(AGENT) as agent, platform.client(ADMIN) as admin:
        found = {tool.name: tool for tool in tools(agent, wait_s=60)}
        assert set(found) == {"StartSubscription", "IssueRefund", "CancelSubscription"}
        issue = found["IssueRefund"]
        assert issue.parameters["required"] == ["aggregate_id", "payload"]
        assert issue.parameters["properties"]["payload"]["properties"]["amount_cents"]["type"] == "integer"
        assert "Governed by Keel" in issue.description
        name = subscription(agent)

        small = issue({"aggregate_id": name, "payload": refund(1_000), **SUBJECT})
        assert (small["outcome"], small["status"], small["done"]) == ("executed", "executed", True), small
        assert [(e["provider"], e["state"]) for e in small["effects"]] == [("payments", "succeeded")], small
        assert "RefundIssued" in small["events"]

        denied = found["CancelSubscription"](aggregate_id=name, payload={"reason": "asked"}, **SUBJECT)
        assert (denied["outcome"], denied["code"]) == ("refused", "policy_denied"), denied

        for malformed, field in ((f'{{"aggregate_id": "{name}", "payload": "500"}}', "payload"),
                                 ({"payload": refund(1_000)}, "aggregate_id"),
                                 ({"aggregate_id": name, "payload": refund(1_000), "tenant_id": "globex"},
                                  "tenant_id"),
                                 ({"aggregate_id": name, "payload": {**refund(1_000), "amount_cents": "x"}},
                                  "payload.amount_cents"),
                                 ("{not json", "arguments"),
                                 ([1, 2], "arguments")):
            answer = issue(malformed)
            assert (answer["outcome"], answer["code"], answer["field"]) == (
                "refused", "schema_violation", field), answer

        parked = issue({"aggregate_id": name, "payload": refund(500_000), **SUBJECT})
        assert (parked["outcome"], parked["rule"], parked["decided_by"]) == ("pending_approval", RULE, "approver")
        assert "approver (admin)" in parked["reason"] and parked["done"] is False, parked
        parked_id = uuid.UUID(parked["command_id"])

        [waiting] = [a for a in admin.approvals() if a.command_id == parked_id]
        assert (waiting.policy_rule, waiting.actor, waiting.on_behalf_of) == (RULE, AGENT, "cust-1")
        decision = admin.approve(parked_id, "a long outage")
        assert admin.wait(decision.command_id, "executed").status is CommandStatus.EXECUTED
        final = agent.wait(parked_id, "succeeded")
        assert [(e.provider, e.state) for e in final.effects] == [("payments", EffectState.SUCCEEDED)]
        assert parked_id not in {a.command_id for a in admin.approvals()}


def test_the_async_client_and_tools_do_the_same_and_a_rejection_ends_the_wait(platform: Platform) -> None:
    with platform.client(AGENT) as sync_agent:
        name = subscription(sync_agent)

    async def story() -> None:
        async with platform.async_client(AGENT) as agent, platform.async_client(ADMIN) as admin:
            assert {action.type for action in await agent.actions()} == {
                "StartSubscription", "IssueRefund", "CancelSubscription"}
            assert (await agent.explain("IssueRefund", name, refund(500_000), **SUBJECT)).rule == RULE
            accepted = await agent.submit("IssueRefund", name, refund(2_000), **SUBJECT)
            done = await agent.wait(accepted.command_id, "succeeded")
            assert (done.status, (await agent.status(accepted.command_id)).summary.done) == (
                CommandStatus.EXECUTED, True)
            with pytest.raises(RequestRefused) as refused:
                await agent.submit("IssueRefund", name, {"currency": "EUR"}, **SUBJECT)
            assert (refused.value.code, refused.value.field) == ("schema_violation", "payload.amount_cents")

            issue = {tool.name: tool for tool in await async_tools(agent, wait_s=60)}["IssueRefund"]
            assert (await issue({"aggregate_id": name}))["field"] == "payload.amount_cents"
            parked = await issue({"aggregate_id": name, "payload": refund(300_000), **SUBJECT})
            assert (parked["outcome"], parked["rule"]) == ("pending_approval", RULE), parked
            parked_id = uuid.UUID(parked["command_id"])
            assert parked_id in {a.command_id for a in await admin.approvals()}
            decision = await admin.reject(parked_id, "not this time")
            assert (await admin.wait(decision.command_id, "executed")).status is CommandStatus.EXECUTED
            with pytest.raises(EndedOtherwise) as ended:
                await agent.wait(parked_id, "executed")
            assert ended.value.record.status is CommandStatus.REJECTED

    anyio.run(story)


def test_an_analyst_queries_the_tenants_projections_as_a_dataframe(platform: Platform) -> None:
    with platform.client(AGENT) as agent:
        name = subscription(agent)
    with platform.client(ANALYST) as analyst:
        sql = f"SELECT aggregate_id, type FROM events WHERE aggregate_id = '{name}'"
        wait_until(lambda: len(analyst.query(sql)) > 0, f"{name}'s events projected")
        frame = analyst.query(sql)
        assert list(frame.columns) == ["aggregate_id", "type"]
        assert set(frame["aggregate_id"]) == {name} and "SubscriptionStarted" in set(frame["type"])
        with pytest.raises(RequestRefused) as outside:
            analyst.query("SELECT * FROM system.tables")
        assert (outside.value.status, outside.value.code) == (400, "table_not_allowed")
    with platform.client(AGENT) as agent, pytest.raises(RequestRefused) as forbidden:
        agent.query("SELECT 1")
    assert (forbidden.value.status, forbidden.value.code) == (403, "forbidden")


def test_the_documented_example_plays_every_outcome_an_agent_meets(platform: Platform) -> None:
    played = subprocess.run([sys.executable, str(PROJECT_ROOT / "examples" / "agent_tool" / "scripted_agent.py"),
                             "--gateway", platform.gateway, "--key", platform.tokens[AGENT.id],
                             "--approver-key", platform.tokens[ADMIN.id]],
                            capture_output=True, text=True, timeout=180, check=False)
    assert played.returncode == 0, played.stdout + played.stderr
    answers = [json.loads(line.partition(" -> ")[2]) for line in played.stdout.splitlines() if line.startswith("[")]
    assert [(a["outcome"], a.get("code"), a.get("field")) for a in answers] == [
        ("executed", None, None), ("executed", None, None), ("refused", "schema_violation", "payload.amount_cents"),
        ("refused", "currency_mismatch", None), ("pending_approval", None, None)], played.stdout
    assert answers[1]["effects"][0]["state"] == "succeeded" and answers[4]["rule"] == RULE
    assert f"approved {answers[4]['command_id']} -> executed, effects [('payments', 'succeeded')]" in played.stdout


def test_an_arrow_stream_answer_reads_into_a_dataframe() -> None:
    """The parser of ``query``'s answer, on the bytes ``pyarrow`` writes (the gateway's are tested above)."""
    table = pyarrow.table({"type": ["RefundIssued", "EmailQueued"], "n": [3, 1]})
    sink = pyarrow.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    request = httpx.Request("GET", "http://gateway/v1/query")
    answered = httpx.Response(200, headers={"content-type": core.ARROW_STREAM}, content=sink.getvalue().to_pybytes(),
                              request=request)
    frame = core.query("SELECT 1", 10, 1.0, 1.0).parse(answered)
    assert frame.to_dict("records") == [{"type": "RefundIssued", "n": 3}, {"type": "EmailQueued", "n": 1}]
    with pytest.raises(KeelError) as other:
        core.query("SELECT 1", 10, 1.0, 1.0).parse(httpx.Response(200, json={"rows": []}, request=request))
    assert other.value.code == "unexpected_media_type"
