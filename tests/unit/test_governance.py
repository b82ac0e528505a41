"""The governed decision, without Kafka: every refusal is a typed event; approvals resume once."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import reduce

import pytest

from keel.domain.aggregate import EMPTY, AggregateState, evolve_aggregate
from keel.domain.envelope import Actor, ActorKind, Envelope, Payload, new_command
from keel.domain.events import ApprovalKind
from keel.domain.governance.controls import Controls, TenantControls
from keel.domain.governance.pipeline import Context, govern
from keel.domain.governance.policy import SYSTEM_ACTOR, parse_policy
from keel.domain.governance.ratelimit import RateLimiter
from keel.domain.messages import ApproveCommand, CommandRejected, ExpireApproval, RejectCommand, SetKillSwitch, SetPolicy, SwitchScope, TripBreaker
from keel.processor.handler import Governance
from support_desk.messages import CancelSubscription, IssueRefund, StartSubscription
from support_desk.subscription import SubscriptionState

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
ADMIN = Actor(kind=ActorKind.HUMAN, id="jane.lead")
CUSTOMER = Actor(kind=ActorKind.HUMAN, id="cust-ada")
POLICY = {
    "version": "v7",
    "roles": {"support-agent": ["CancelSubscription", "IssueRefund", "SendEmail", "StartSubscription"],
              "admin": ["*"]},
    "grants": {"agent:support-bot": ["support-agent"], "human:jane.lead": ["admin"]},
    "rules": [
        {"name": "big-refunds-need-admin", "match": {"command_types": ["IssueRefund"],
                                                     "payload": {"amount_cents": {"gt": 100000}}},
         "decision": "approve"},
        {"name": "unsure-agent-asks-customer", "match": {"command_types": ["IssueRefund"],
                                                         "confidence_below": 0.5}, "decision": "confirm"},
        {"name": "no-cancellations-on-sunday", "match": {"command_types": ["CancelSubscription"],
                                                         "weekdays": [6]}, "decision": "deny"},
    ],
    "rate_limits": {"actor_per_minute": 3},
    "approval_ttl_seconds": 3600,
}
RULES: list[object] = POLICY["rules"]  # type: ignore[assignment]


def refunded_cents(world: World) -> int:
    """The subscription's refunded total, as its state holds it."""
    state = world.state.domain
    assert isinstance(state, SubscriptionState)
    return state.refunded_cents


def cmd(payload: Payload, actor: Actor = AGENT, tenant: str = "acme", aggregate: str = "sub-1") -> Envelope:
    return new_command(payload, tenant_id=tenant, aggregate_id=aggregate, actor=actor, on_behalf_of="cust-ada")


class World:
    """One aggregate, its tenant's controls and a clock, driven command by command."""

    def __init__(self, policy: dict | None = None) -> None:  # type: ignore[type-arg]
        self.controls = TenantControls()
        if policy is not None:
            self.controls.policy = parse_policy(json.dumps(policy))
        self.limiter = RateLimiter()
        self.state: AggregateState = EMPTY
        self.now = NOW

    def send(self, command: Envelope, **context: str) -> list[Envelope]:
        decision = govern(command, self.state, Context(self.controls, self.limiter, self.now, **context))
        self.state = reduce(evolve_aggregate, decision.events, self.state)
        controls = Controls({command.tenant_id: self.controls})
        for key, value in decision.controls:
            controls.apply(key, value)
        return decision.events


def opened(policy: dict | None = POLICY) -> World:  # type: ignore[type-arg]
    world = World(policy)
    world.send(cmd(StartSubscription(customer_id="cust-ada", plan="pro", monthly_price_cents=500_000,
                                     currency="EUR")))
    return world


def rejection_code(events: list[Envelope]) -> str:
    [event] = events
    assert isinstance(event.payload, CommandRejected), event.type
    assert event.version is None
    return event.payload.code


def refund(amount: int, confidence: float | None = None) -> IssueRefund:
    return IssueRefund(amount_cents=amount, currency="EUR", reason="r", confidence=confidence)


def test_an_allowed_command_records_role_rule_and_policy_version() -> None:
    [event] = opened().send(cmd(refund(1000)))
    assert event.type == "RefundIssued"
    assert (event.authority.role, event.authority.policy_rule, event.authority.policy_version) == (
        "support-agent", "default", "v7")


@pytest.mark.parametrize(("command_kwargs", "context", "code"), [
    ({}, {"principal_tenant": "globex"}, "wrong_tenant"),
    ({"actor": Actor(kind=ActorKind.AGENT, id="rogue-bot")}, {}, "no_role"),
])
def test_isolation_and_rbac_refusals_are_typed_events(command_kwargs: dict, context: dict, code: str) -> None:  # type: ignore[type-arg]
    world = opened()
    assert rejection_code(world.send(cmd(refund(1000), **command_kwargs), **context)) == code
    assert refunded_cents(world) == 0


def test_a_policy_deny_rule_refuses_and_names_itself() -> None:
    world = opened()
    world.now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)  # a Sunday
    [event] = world.send(cmd(CancelSubscription(reason="x")))
    assert rejection_code([event]) == "policy_denied"
    assert event.authority.policy_rule == "no-cancellations-on-sunday"


def test_kill_switches_on_agent_and_command_type_refuse_until_released() -> None:
    world = opened()
    world.controls.killed_agents.add("support-bot")
    assert rejection_code(world.send(cmd(refund(100)))) == "kill_switch"
    world.controls.killed_agents.clear()
    world.controls.killed_command_types.add("IssueRefund")
    assert rejection_code(world.send(cmd(refund(100)))) == "kill_switch"
    world.controls.killed_command_types.clear()
    assert world.send(cmd(refund(100)))[0].type == "RefundIssued"


def test_an_open_breaker_halts_the_agent() -> None:
    world = opened()
    world.controls.tripped_agents.add("support-bot")
    assert rejection_code(world.send(cmd(refund(100)))) == "breaker_open"


def test_the_actor_rate_limit_refuses_past_the_limit_and_refills() -> None:
    world = opened()  # the start used one of the agent's three tokens
    assert [world.send(cmd(refund(10)))[0].type for _ in range(2)] == ["RefundIssued"] * 2
    assert rejection_code(world.send(cmd(refund(10)))) == "rate_limited"
    world.now += timedelta(seconds=20)  # one token back
    assert world.send(cmd(refund(10)))[0].type == "RefundIssued"


def test_a_big_refund_waits_for_an_admin_and_executes_exactly_once() -> None:
    world = opened()
    big = cmd(refund(200_000))
    [parked] = world.send(big)
    assert parked.type == "ApprovalRequested" and parked.version == 2
    assert refunded_cents(world) == 0
    assert rejection_code(world.send(cmd(ApproveCommand(command_id=big.id), actor=AGENT))) == "self_approval"
    assert rejection_code(world.send(cmd(ApproveCommand(command_id=big.id),
                                         actor=Actor(kind=ActorKind.HUMAN, id="intern")))) == "not_an_approver"

    approval = cmd(ApproveCommand(command_id=big.id), actor=ADMIN)
    granted, refunded = world.send(approval)

    assert granted.type == "ApprovalGranted" and granted.actor == ADMIN
    assert refunded.type == "RefundIssued" and refunded.actor == AGENT and refunded.causation_id == big.id
    assert refunded.authority.approval_id == str(approval.id)
    assert refunded_cents(world) == 200_000
    assert rejection_code(world.send(cmd(ApproveCommand(command_id=big.id), actor=ADMIN))) == "not_pending"
    assert refunded_cents(world) == 200_000


def test_an_unsure_agent_needs_the_customers_confirmation() -> None:
    world = opened()
    unsure = cmd(refund(500, confidence=0.2))
    [parked] = world.send(unsure)
    assert parked.payload.approval_kind is ApprovalKind.CONFIRMATION  # type: ignore[attr-defined]
    assert rejection_code(world.send(cmd(ApproveCommand(command_id=unsure.id), actor=ADMIN))) == "not_the_subject"
    assert [e.type for e in world.send(cmd(ApproveCommand(command_id=unsure.id), actor=CUSTOMER))] == [
        "ApprovalGranted", "RefundIssued"]


def test_resume_reauthorizes_against_current_roles_and_switches() -> None:
    world = opened()
    big = cmd(refund(200_000))
    world.send(big)
    world.controls.killed_agents.add("support-bot")  # switched off while it waited
    [rejected] = world.send(cmd(ApproveCommand(command_id=big.id), actor=ADMIN))
    assert rejected.type == "ApprovalRejected"
    assert "kill_switch" in rejected.payload.reason  # type: ignore[attr-defined]
    assert world.state.pending == {} and refunded_cents(world) == 0

    demoted = {**POLICY, "version": "v8", "grants": {"human:jane.lead": ["admin"]}}
    world = opened()
    world.send(big)
    world.controls.policy = parse_policy(json.dumps(demoted))  # the agent lost its role
    [rejected] = world.send(cmd(ApproveCommand(command_id=big.id), actor=ADMIN))
    assert "no_role" in rejected.payload.reason  # type: ignore[attr-defined]


def test_rejected_and_expired_approvals_never_execute() -> None:
    world = opened()
    first, second = cmd(refund(200_000)), cmd(refund(300_000))
    world.send(first)
    world.send(second)
    assert world.send(cmd(RejectCommand(command_id=first.id, reason="no"), actor=ADMIN))[0].type == "ApprovalRejected"
    watcher = Actor(kind=ActorKind.SERVICE, id="keel-approval-watcher")
    assert rejection_code(world.send(cmd(ExpireApproval(command_id=second.id), actor=watcher))) == "not_due"
    world.now += timedelta(hours=2)
    assert world.send(cmd(ExpireApproval(command_id=second.id), actor=watcher))[0].type == "ApprovalExpired"
    assert rejection_code(world.send(cmd(ApproveCommand(command_id=second.id), actor=ADMIN))) == "not_pending"
    assert refunded_cents(world) == 0 and world.state.pending == {}


def test_controls_commands_go_to_the_controls_aggregate_and_emit_records() -> None:
    world = World(POLICY)
    switch = SetKillSwitch(scope=SwitchScope.AGENT, target="support-bot", engaged=True, reason="incident")
    assert rejection_code(world.send(cmd(switch, actor=ADMIN))) == "wrong_aggregate"
    decision = govern(cmd(switch, actor=ADMIN, aggregate="controls"), EMPTY,
                      Context(world.controls, world.limiter, NOW))
    assert [e.type for e in decision.events] == ["KillSwitchEngaged"]
    assert decision.controls == [("acme/kill-agent/support-bot", b'{"reason": "incident"}')]
    trip = govern(cmd(TripBreaker(agent_id="support-bot", reason="80% rejected"), actor=SYSTEM_ACTOR,
                      aggregate="controls"), EMPTY, Context(world.controls, world.limiter, NOW))
    assert trip.controls[0][0] == "acme/breaker/support-bot"


def test_a_malformed_policy_is_refused_and_a_valid_one_takes_effect() -> None:
    world = World()
    bad = cmd(SetPolicy(document='{"version": "x"}'), actor=SYSTEM_ACTOR, aggregate="controls")
    assert rejection_code(world.send(bad)) == "malformed_policy"
    good = cmd(SetPolicy(document=json.dumps(POLICY)), actor=SYSTEM_ACTOR, aggregate="controls")
    [published] = world.send(good)
    assert published.type == "PolicyPublished"
    assert world.controls.policy.version == "v7"


def test_the_default_policy_parks_large_refunds_for_an_admin_nobody_holds_yet() -> None:
    world = opened(policy=None)
    [parked] = world.send(cmd(refund(500_000)))
    assert parked.type == "ApprovalRequested" and parked.causation_id is not None
    assert rejection_code(world.send(cmd(ApproveCommand(command_id=parked.causation_id), actor=ADMIN))) == \
        "not_an_approver"


def test_a_policy_answers_from_its_memo_as_it_would_without_one_and_a_copy_answers_for_itself() -> None:
    policy = parse_policy(json.dumps({**POLICY, "rules": [
        {"name": "refunds-any-type", "match": {"payload": {"amount_cents": {"gt": 10}}}, "decision": "deny"},
        *RULES]}))
    refund, cancel = cmd(IssueRefund(amount_cents=500_000, currency="EUR", reason="x")), cmd(CancelSubscription(reason="x"))
    sunday = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    for _ in range(2):  # the second round answers from the memo
        assert policy.permitting_role(AGENT, "IssueRefund") == "support-agent"
        assert policy.permitting_role(AGENT, "SetPolicy") is None
        assert policy.evaluate(refund, NOW) == ("deny", "refunds-any-type")  # a rule naming no type applies to all
        assert policy.evaluate(cancel, sunday) == ("deny", "no-cancellations-on-sunday")
        assert policy.evaluate(cancel, NOW + timedelta(days=1)) == ("allow", "default")
    narrowed = policy.model_copy(update={"grants": {}, "rules": ()})
    assert narrowed.permitting_role(AGENT, "IssueRefund") is None
    assert narrowed.evaluate(refund, NOW) == ("allow", "default")
    assert policy == parse_policy(json.dumps({**POLICY, "rules": [
        {"name": "refunds-any-type", "match": {"payload": {"amount_cents": {"gt": 10}}}, "decision": "deny"},
        *RULES]}))  # the memo is no part of what a policy is


def test_the_processor_reads_a_tenants_controls_once_per_decision_time() -> None:
    controls = Controls()
    governance = Governance(controls, RateLimiter())
    first = governance.context("acme", b"acme", NOW)
    assert governance.context("acme", b"acme", NOW) is first
    assert first.principal_tenant == "acme" and first.now is NOW
    assert governance.context("acme", None, NOW).principal_tenant is None
    assert governance.context("globex", b"acme", NOW).controls is not first.controls

    controls.apply("acme/policy", json.dumps(POLICY).encode())  # another worker's switch, mid-batch
    assert governance.context("acme", b"acme", NOW).controls.policy.version != "v7"  # from the next batch on
    later = NOW + timedelta(seconds=1)
    assert governance.context("acme", b"acme", later).controls.policy.version == "v7"
