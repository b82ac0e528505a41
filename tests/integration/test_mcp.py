"""Agents act through `keel mcp` with the official MCP client, over stdio and streamable HTTP.

Every part is a real process on the real broker: the gateway, the relay, the processor, an
effect worker, the provider simulator and `keel mcp` itself. The agent's key is the only
thing that says who it is: `KEEL_API_KEY` over stdio, the bearer header over HTTP.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from confluent_kafka.admin import AdminClient
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from keel.config import Settings
from keel.domain.commands import SetKillSwitch, SwitchScope
from keel.domain.envelope import Actor, ActorKind
from keel.domain.governance.pipeline import CONTROLS_AGGREGATE
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.kafka.clients import admin_config
from keel.kafka.topics import apply_topics, declared_topics
from tests.broker_faults import free_port
from tests.helpers import command, send
from tests.platform import TENANT, answers, running_platform, wait_until
from tests.processes import keel_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
POLICY = {"version": "mcp-1", "roles": {"support-agent": ["StartSubscription", "IssueRefund", "CancelSubscription"]},
          "grants": {"agent:support-bot": ["support-agent"]},
          "rules": [{"name": "refunds-over-1000-need-an-admin", "decision": "approve",
                     "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}}},
                    {"name": "agents-never-cancel", "decision": "deny",
                     "match": {"command_types": ["CancelSubscription"]}}]}
START = {"customer_id": "cust-1", "plan": "pro", "monthly_price_cents": 1_000_000, "currency": "EUR"}


@dataclass(frozen=True)
class Platform:
    """The running services: the gateway's URL, the agent's key, and the MCP server over HTTP."""

    settings: Settings
    gateway: str
    key: str
    mcp_url: str


@pytest.fixture(scope="module")
def platform(broker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """Every service, started once for the module's tests, on topics of its own."""
    tmp = tmp_path_factory.mktemp("mcp")
    settings = broker_settings.model_copy(update={"topic_prefix": f"test-mcp-{uuid.uuid4().hex[:10]}",
                                                  "clickhouse_database": f"keel_{uuid.uuid4().hex[:10]}",
                                                  "topic_partitions": 3})
    admin = AdminClient(admin_config(settings))
    topics = declared_topics(settings)
    apply_topics(admin, topics)
    mcp_port = free_port()
    mcp_url = f"http://127.0.0.1:{mcp_port}/mcp"
    try:
        with running_platform(settings, tmp, (AGENT,), POLICY, extra=lambda gateway: {
                "mcp": ["mcp", "--gateway", gateway, "--transport", "http", "--port", str(mcp_port)]}) as running:
            wait_until(lambda: answers(mcp_url), "keel mcp")
            yield Platform(settings, running.gateway, running.tokens[AGENT.id], mcp_url)
    finally:
        admin.delete_topics([topic.name for topic in topics], operation_timeout=30)


def test_an_agent_over_stdio_lists_explains_submits_and_follows_actions(platform: Platform) -> None:
    server = StdioServerParameters(command=sys.executable, args=["-m", "keel.cli", "mcp", "--gateway",
                                                                   platform.gateway],
                                   env=keel_env(platform.settings, KEEL_API_KEY=platform.key))

    async def story() -> None:
        async with Client(server) as agent:
            await _the_agents_story(agent)

    anyio.run(story)


def test_agents_over_http_send_their_own_key_and_none_is_refused(platform: Platform) -> None:
    refused = httpx.post(platform.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                         headers={"Accept": "application/json, text/event-stream"}, timeout=10)
    assert refused.status_code == 401, refused.text

    async def story() -> None:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {platform.key}"}, timeout=60) as http, \
                Client(streamable_http_client(platform.mcp_url, http_client=http)) as agent:
            await _the_agents_story(agent)
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer not-a-key"}, timeout=60) as http, \
                Client(streamable_http_client(platform.mcp_url, http_client=http)) as stranger:
            answer = await stranger.call_tool("list_actions", {})
            assert answer.is_error and "[invalid_key]" in _text(answer), _text(answer)

    anyio.run(story)


def test_a_kill_switch_on_the_agent_is_explained_and_refuses_its_actions_until_released(
        platform: Platform) -> None:
    subscription = f"sub-{uuid.uuid4().hex[:6]}"
    refund = {"amount_cents": 1_000, "currency": "EUR", "reason": "outage"}
    asked = {"type": "IssueRefund", "aggregate_id": subscription, "payload": refund, "on_behalf_of": "cust-1"}

    async def story() -> None:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {platform.key}"}, timeout=60) as http, \
                Client(streamable_http_client(platform.mcp_url, http_client=http)) as agent:
            started = await _submit(agent, "StartSubscription", subscription, START)
            assert started["status"] == "executed", started
            _switch(platform.settings, engaged=True)
            try:
                switched = await _explained(agent, asked, "refused")
                assert (switched["code"], switched["rule"]) == ("kill_switch", None), switched
                assert switched["reason"] == "agent support-bot is switched off for this tenant", switched
                refused = await _submit(agent, "IssueRefund", subscription, refund)
                assert (refused["status"], refused["reason_code"], refused["reason"]) == (
                    "rejected", "kill_switch", switched["reason"]), refused
                assert (refused["summary"]["state"], refused["summary"]["done"], refused["events"]) == (
                    "failed", True, ["CommandRejected"]), refused
            finally:
                _switch(platform.settings, engaged=False)
            assert (await _explained(agent, asked, "allow"))["code"] is None
            after = await _submit(agent, "IssueRefund", subscription, refund)
            assert (after["status"], after["summary"]["state"]) == ("executed", "succeeded"), after

    anyio.run(story)


def _switch(settings: Settings, *, engaged: bool) -> None:
    """Engage or release the kill switch on the agent, as `keel kill-switch` sends it."""
    switch = SetKillSwitch(scope=SwitchScope.AGENT, target=AGENT.id, engaged=engaged,
                           reason="runaway refunds" if engaged else "fixed")
    send(settings, command(TENANT, CONTROLS_AGGREGATE, switch, actor=SYSTEM_ACTOR))


async def _explained(agent: Client, asked: dict[str, Any], outcome: str) -> dict[str, Any]:
    """``explain_action``'s answer once it is ``outcome``: the gateway follows the switch once the
    processor has thrown it."""
    deadline = time.monotonic() + 60
    while (found := _ok(await agent.call_tool("explain_action", asked)))["outcome"] != outcome:
        assert time.monotonic() < deadline, f"explain_action still answers {found}, not {outcome}"
        await anyio.sleep(0.3)
    return found


async def _the_agents_story(agent: Client) -> None:
    """What every agent does, whatever the transport."""
    actions = _ok(await agent.call_tool("list_actions", {}))["actions"]
    assert {a["type"] for a in actions} == {"StartSubscription", "IssueRefund", "CancelSubscription"}
    assert all(a["schema"]["type"] == "object" for a in actions)

    subscription = f"sub-{uuid.uuid4().hex[:6]}"
    big = {"amount_cents": 500_000, "currency": "EUR", "reason": "outage"}
    explained = _ok(await agent.call_tool("explain_action", {"type": "IssueRefund", "aggregate_id": subscription,
                                                             "payload": big, "on_behalf_of": "cust-1"}))
    assert (explained["outcome"], explained["rule"]) == ("approve", "refunds-over-1000-need-an-admin")

    started = await _submit(agent, "StartSubscription", subscription, START)
    assert (started["status"], started["summary"]["state"], started["summary"]["done"]) == (
        "executed", "succeeded", True), started

    small = await _submit(agent, "IssueRefund", subscription, {**big, "amount_cents": 1_000})
    assert small["status"] == "executed", small
    assert [(e["provider"], e["state"]) for e in small["effects"]] == [("payments", "succeeded")], small

    denied = await _submit(agent, "CancelSubscription", subscription, {"reason": "asked"})
    assert (denied["status"], denied["reason_code"], denied["summary"]["state"]) == (
        "rejected", "policy_denied", "failed"), denied

    parked = await _submit(agent, "IssueRefund", subscription, big)
    assert (parked["status"], parked["summary"]["state"], parked["summary"]["reason"]) == (
        "pending_approval", "waiting", "approval"), parked

    malformed = await agent.call_tool("submit_action", {"type": "IssueRefund", "aggregate_id": subscription,
                                                        "payload": "500000"})
    assert malformed.is_error and _text(malformed).startswith("[schema_violation] payload:"), _text(malformed)
    unknown = await agent.call_tool("submit_action", {"type": "NoSuchAction", "aggregate_id": subscription,
                                                      "payload": {}})
    assert unknown.is_error and "[unknown_type]" in _text(unknown), _text(unknown)


async def _submit(agent: Client, action: str, aggregate_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Submit an action and follow it until it is done or waits on someone."""
    accepted = _ok(await agent.call_tool("submit_action", {"type": action, "aggregate_id": aggregate_id,
                                                           "payload": payload, "on_behalf_of": "cust-1"}))
    deadline = time.monotonic() + 90  # the first command waits for the processor to join its group
    while True:
        found = _ok(await agent.call_tool("get_action_status", {"command_id": accepted["command_id"],
                                                                "wait_s": 30}))
        if found["summary"]["done"] or found["summary"]["state"] == "waiting" or time.monotonic() > deadline:
            return found


def _ok(answer: CallToolResult) -> dict[str, Any]:
    assert not answer.is_error, _text(answer)
    assert answer.structured_content is not None
    return dict(answer.structured_content)


def _text(answer: CallToolResult) -> str:
    return " ".join(getattr(block, "text", "") for block in answer.content)
