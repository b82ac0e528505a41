"""Which actions a policy offers a key, and explain's dry run against the processor's own governance."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from keel.domain.aggregate import EMPTY
from keel.domain.envelope import Actor, ActorKind, Envelope, Payload, new_command
from keel.domain.events import ApprovalKind, ApprovalRequested, CommandRejected
from keel.domain.governance.controls import TenantControls
from keel.domain.governance.pipeline import Context, govern
from keel.domain.governance.policy import parse_policy
from keel.domain.governance.ratelimit import RateLimiter
from keel.domain.messages import SetPolicy
from keel.gateway.actions import Explanation, allowed_actions, explain
from keel.gateway.errors import NotExplainable
from support_desk.messages import IssueRefund, SendEmail, StartSubscription

NOW = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)
BOT = Actor(kind=ActorKind.AGENT, id="bot")
ANN = Actor(kind=ActorKind.HUMAN, id="ann")
POLICY = parse_policy(json.dumps({
    "version": "p-1", "roles": {"agent": ["IssueRefund", "SendEmail", "StartSubscription"], "admin": ["*"]},
    "grants": {"agent:bot": ["agent"], "human:ann": ["admin"]},
    "rules": [{"name": "huge", "decision": "deny", "match": {"payload": {"amount_cents": {"gt": 500_000}}}},
              {"name": "big", "decision": "approve", "match": {"payload": {"amount_cents": {"gt": 100_000}}}},
              {"name": "unsure", "decision": "confirm", "match": {"confidence_below": 0.5}}],
    "rate_limits": {"actor_per_minute": 1}}))


def refund(amount: int, confidence: float | None = None, actor: Actor = BOT, **envelope: str | None) -> Envelope:
    return command(IssueRefund(amount_cents=amount, currency="EUR", reason="late", confidence=confidence),
                   actor, **envelope)


def command(payload: Payload, actor: Actor = BOT, **envelope: str | None) -> Envelope:
    envelope.setdefault("on_behalf_of", "cust-1")
    return new_command(payload, tenant_id="acme", aggregate_id="sub-1", actor=actor, **envelope)  # type: ignore[arg-type]


def start() -> Envelope:
    return command(StartSubscription(customer_id="cust-1", plan="pro", monthly_price_cents=900, currency="EUR"))


def test_a_key_is_offered_the_domain_commands_its_roles_may_send_and_no_internal_ones() -> None:
    assert {a.type for a in allowed_actions(POLICY, BOT)} == {"IssueRefund", "SendEmail", "StartSubscription"}
    everything = {a.type for a in allowed_actions(POLICY, ANN)}
    assert {"IssueRefund", "CancelSubscription", "ReverseRefund"} <= everything
    assert not everything & {"SetPolicy", "ApproveCommand", "SetKillSwitch", "CompleteEffect"}
    assert allowed_actions(POLICY, Actor(kind=ActorKind.AGENT, id="stranger")) == []
    [issue] = [a for a in allowed_actions(POLICY, BOT) if a.type == "IssueRefund"]
    assert (issue.domain, issue.aggregate, issue.description) == (
        "support_desk", "subscription", "Refund part or all of what the customer paid.")
    assert "amount_cents" in issue.model_dump()["schema"]["properties"]


@pytest.mark.parametrize(("sent", "controls", "expected"), [
    (start(), TenantControls(POLICY), ("allow", "default", None)),
    (refund(200_000), TenantControls(POLICY), ("approve", "big", None)),
    (refund(900_000), TenantControls(POLICY), ("deny", "huge", "policy_denied")),
    (refund(50, confidence=0.2), TenantControls(POLICY), ("confirm", "unsure", None)),
    (refund(50, confidence=0.2, on_behalf_of=None), TenantControls(POLICY), ("refused", "unsure", "no_subject")),
    (refund(50, actor=Actor(kind=ActorKind.AGENT, id="stranger")), TenantControls(POLICY),
     ("refused", None, "no_role")),
    (refund(50), TenantControls(POLICY, killed_agents={"bot"}), ("refused", None, "kill_switch")),
    (refund(50), TenantControls(POLICY, killed_command_types={"IssueRefund"}), ("refused", None, "kill_switch")),
    (refund(50), TenantControls(POLICY, tripped_agents={"bot"}), ("refused", None, "breaker_open")),
], ids=["allow", "approve", "deny", "confirm", "confirm-without-subject", "no-role", "killed-agent",
        "killed-type", "breaker"])
def test_explain_says_what_the_processor_decides(sent: Envelope, controls: TenantControls,
                                                 expected: tuple[str, str | None, str | None]) -> None:
    told = explain(sent, controls, NOW)
    assert (told.outcome, told.rule, told.code) == expected and told.policy_version == "p-1"
    assert told.reason
    assert decided(sent, controls) == (told.outcome, told.code)


def decided(sent: Envelope, controls: TenantControls) -> tuple[str, str | None]:
    """What the processor's own governance made of ``sent``, in explain's terms."""
    first = govern(sent, EMPTY, Context(controls, RateLimiter(), NOW)).events[0].payload
    if isinstance(first, CommandRejected):
        return ("deny" if first.code == "policy_denied" else "refused"), first.code
    if isinstance(first, ApprovalRequested):
        return {ApprovalKind.APPROVAL: "approve", ApprovalKind.CONFIRMATION: "confirm"}[first.approval_kind], None
    return "allow", None


def test_explaining_spends_no_rate_limit() -> None:
    controls = TenantControls(POLICY)  # one command per minute per actor
    assert [explain(start(), controls, NOW).outcome for _ in range(3)] == ["allow"] * 3


def test_keels_own_commands_are_not_explained() -> None:
    with pytest.raises(NotExplainable):
        explain(command(SetPolicy(document="{}"), ANN), TenantControls(POLICY), NOW)


def test_an_explanation_reads_back_from_its_json() -> None:
    told = explain(command(SendEmail(to_address="a@example.com", template="hi")), TenantControls(POLICY), NOW)
    assert Explanation.model_validate_json(told.model_dump_json()) == told
