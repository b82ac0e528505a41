"""The governed decision: what one command yields, after every check Keel promises.

Order of checks: tenant isolation → authorization (RBAC) → kill switches → circuit
breaker → rate limits → policy (allow, confirm, approve, deny) → the domain's ``decide``.
Approvals resume a parked command through the same checks again (current roles, switches
and policy), so a command whose actor lost the role, or whose agent was switched off
while it waited, does not run. Every refusal is an event with a machine-readable code.
Pure: the processor supplies the state, the controls, the limiter and the clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from keel.domain.aggregate import AggregateState
from keel.domain.envelope import ActorKind, Authority, Envelope, Payload
from keel.domain.events import (
    ApprovalExpired,
    ApprovalGranted,
    ApprovalKind,
    ApprovalRejected,
    ApprovalRequested,
    BreakerReset,
    BreakerTripped,
    KillSwitchEngaged,
    KillSwitchReleased,
    PolicyPublished,
    ProviderBreakerClosed,
    ProviderBreakerOpened,
)
from keel.domain.commands import (
    ApproveCommand,
    CloseProviderBreaker,
    ExpireApproval,
    OpenProviderBreaker,
    RejectCommand,
    ResetBreaker,
    SetKillSwitch,
    SetPolicy,
    TripBreaker,
)
from keel.domain.governance.controls import TenantControls, policy_record, switch_record
from keel.domain.governance.effects import EFFECT_COMMANDS, settle
from keel.domain.governance.policy import Outcome, is_system, parse_policy
from keel.domain.governance.ratelimit import RateLimiter
from keel.domain.outcomes import to_events
from keel.domain.deciding import decide, reject
from keel.errors import ValidationError

CONTROLS_AGGREGATE = "controls"
APPROVAL_COMMANDS = (ApproveCommand, RejectCommand, ExpireApproval)
CONTROL_COMMANDS = (SetKillSwitch, TripBreaker, ResetBreaker, SetPolicy, OpenProviderBreaker, CloseProviderBreaker)


@dataclass(frozen=True)
class Decision:
    """The events a command yields, and the controls records they put in force."""

    events: list[Envelope]
    controls: list[tuple[str, bytes | None]] = field(default_factory=list)
    origin_type: str | None = None
    """The type of the command the events are about: the decided command's, or the parked
    command's when an approval resumes it (effect workers check its kill switch). ``govern``
    always sets it."""


@dataclass(frozen=True)
class Refusal:
    code: str
    reason: str


@dataclass(frozen=True)
class Context:
    """Everything besides the command and its aggregate that a decision depends on."""

    controls: TenantControls
    limiter: RateLimiter
    now: datetime
    principal_tenant: str | None = None
    """Tenant of the authenticated producer (from the record header), if it said."""
    now_s: float = field(init=False)
    """``now`` in epoch seconds, computed once: a context serves a batch's commands, and
    ``datetime.timestamp`` is no cheap call."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "now_s", self.now.timestamp())  # frozen: set once, here


def govern(command: Envelope, state: AggregateState, ctx: Context) -> Decision:
    """Decide ``command`` against its aggregate under the tenant's current controls."""
    # Keel's own commands by their class (one look-up, not a dozen class checks); a team's go to _governed.
    route = _ROUTES.get(type(command.payload), _governed)
    refusal = _isolation(command, ctx)
    if refusal is None and route is _control and command.aggregate_id != CONTROLS_AGGREGATE:
        refusal = Refusal("wrong_aggregate", f"{command.type} goes to the '{CONTROLS_AGGREGATE}' aggregate")
    if refusal is not None:
        return _refused(command, state, ctx, refusal)
    return route(command, state, ctx)


def _isolation(command: Envelope, ctx: Context) -> Refusal | None:
    if ctx.principal_tenant is not None and ctx.principal_tenant != command.tenant_id:
        return Refusal("wrong_tenant", f"the producer is authenticated for tenant {ctx.principal_tenant!r}, "
                                       f"the command claims {command.tenant_id!r}")
    return None


def authorize(command: Envelope, ctx: Context, *, rate_limit: bool = True) -> tuple[str, Refusal | None]:
    """The role that permits ``command`` and the first guardrail that refuses it, if any."""
    controls, actor = ctx.controls, command.actor
    role = "system" if is_system(actor) else controls.policy.permitting_role(actor, command.type)
    if role is None:
        return "", Refusal("no_role", f"{actor.kind}:{actor.id} holds no role that may send {command.type}")
    if actor.id in controls.killed_agents:
        return role, Refusal("kill_switch", f"agent {actor.id} is switched off for this tenant")
    if command.type in controls.killed_command_types:
        return role, Refusal("kill_switch", f"{command.type} is switched off for this tenant")
    if actor.id in controls.tripped_agents:
        return role, Refusal("breaker_open", f"the circuit breaker of {actor.id} is open")
    limits = controls.policy.rate_limits
    buckets = [(key, limit) for key, limit in (
        (f"{command.tenant_id}", limits.tenant_per_minute),
        (f"{command.tenant_id}/{actor.kind}:{actor.id}", limits.actor_per_minute)) if limit]
    if rate_limit and buckets:
        exhausted = ctx.limiter.admit(buckets, ctx.now_s)
        if exhausted is not None:
            return role, Refusal("rate_limited", f"rate limit of {exhausted} reached")
    return role, None


def _governed(command: Envelope, state: AggregateState, ctx: Context) -> Decision:
    role, refusal = authorize(command, ctx)
    if refusal is not None:
        return _refused(command, state, ctx, refusal)
    policy = ctx.controls.policy
    outcome, rule = policy.evaluate(command, ctx.now)
    authority = _authority(command.authority, role=role, policy_rule=rule, policy_version=policy.version)
    if outcome is Outcome.DENY:
        return _refused(command, state, ctx, Refusal("policy_denied", f"policy rule {rule!r} denies it"),
                        authority)
    if outcome in (Outcome.APPROVE, Outcome.CONFIRM):
        if outcome is Outcome.CONFIRM and not command.on_behalf_of:
            return _refused(command, state, ctx, Refusal(
                "no_subject", f"policy rule {rule!r} needs the on-behalf-of subject to confirm, and there is none"),
                authority)
        parked = ApprovalRequested(
            command_id=command.id, command_type=command.type,
            approval_kind=ApprovalKind.CONFIRMATION if outcome is Outcome.CONFIRM else ApprovalKind.APPROVAL,
            policy_rule=rule, policy_version=policy.version,
            expires_at=ctx.now + timedelta(seconds=policy.approval_ttl_seconds),
            command=command.model_dump_json())
        return Decision(to_events(command, [parked], version=state.version, now=ctx.now, authority=authority),
                        origin_type=command.type)
    return Decision(to_events(command, decide(command, state), version=state.version,
                              now=ctx.now, authority=authority), origin_type=command.type)


def _approval(command: Envelope, state: AggregateState, ctx: Context) -> Decision:
    payload = command.payload
    assert isinstance(payload, APPROVAL_COMMANDS)
    parked = state.pending.get(payload.command_id)
    if parked is None:
        return _refused(command, state, ctx, Refusal(
            "not_pending", f"command {payload.command_id} is not waiting for approval on this aggregate"))
    if isinstance(payload, ExpireApproval):
        if ctx.now < parked.expires_at:
            return _refused(command, state, ctx, Refusal("not_due", f"the approval runs until {parked.expires_at}"))
        return _emit(command, state, ctx, [ApprovalExpired(command_id=payload.command_id)])
    approver = f"{command.actor.kind}:{command.actor.id}"
    role = _approver_role(command, parked.kind, parked.command, ctx)
    if isinstance(role, Refusal):
        return _refused(command, state, ctx, role)
    if ctx.now >= parked.expires_at:
        return _emit(command, state, ctx, [ApprovalExpired(command_id=payload.command_id)])
    if isinstance(payload, RejectCommand):
        return _emit(command, state, ctx, [ApprovalRejected(
            command_id=payload.command_id, approver=approver, reason=payload.reason)])
    # Resume: authorize the parked command again against what holds *now*.
    original = parked.command
    original_role, refusal = authorize(original, ctx, rate_limit=False)
    outcome, rule = ctx.controls.policy.evaluate(original, ctx.now)
    if refusal is None and outcome is Outcome.DENY:
        refusal = Refusal("policy_denied", f"policy rule {rule!r} now denies it")
    if refusal is not None:
        return _emit(command, state, ctx, [ApprovalRejected(
            command_id=payload.command_id, approver="keel",
            reason=f"re-authorization on resume failed: [{refusal.code}] {refusal.reason}")])
    granted = to_events(command, [ApprovalGranted(command_id=original.id, approver=approver,
                                                  comment=payload.comment)],
                        version=state.version, now=ctx.now,
                        authority=_authority(command.authority, role=role))
    authority = _authority(original.authority, role=original_role, policy_rule=parked.policy_rule,
                           policy_version=parked.policy_version, approval_id=str(command.id))
    executed = to_events(command, decide(original, state), version=granted[-1].version or 0,
                         now=ctx.now, authority=authority, origin=original, first_index=1)
    return Decision(granted + executed, origin_type=original.type)


def _approver_role(command: Envelope, kind: ApprovalKind, original: Envelope, ctx: Context) -> str | Refusal:
    actor = command.actor
    if kind is ApprovalKind.CONFIRMATION:
        if actor.kind is not ActorKind.HUMAN or actor.id != original.on_behalf_of:
            return Refusal("not_the_subject", f"only {original.on_behalf_of} may confirm this command")
        return "subject"
    if actor == original.actor:
        return Refusal("self_approval", "an actor cannot approve its own command")
    role = ctx.controls.policy.may_approve(actor)
    if role is None:
        return Refusal("not_an_approver", f"{actor.kind}:{actor.id} holds no approver role in this tenant")
    return role


def _control(command: Envelope, state: AggregateState, ctx: Context) -> Decision:
    role, refusal = authorize(command, ctx, rate_limit=False)
    if refusal is not None and refusal.code != "breaker_open":  # a halted agent's switch can still be thrown
        return _refused(command, state, ctx, refusal)
    tenant, controls = command.tenant_id, ctx.controls
    authority = _authority(command.authority, role=role)
    events: list[Payload]
    match command.payload:
        case SetKillSwitch(scope=scope, target=target, engaged=engaged, reason=reason):
            events = [KillSwitchEngaged(scope=scope, target=target, reason=reason) if engaged
                      else KillSwitchReleased(scope=scope, target=target, reason=reason)]
            records = [switch_record(tenant, f"kill-{scope}", target, engaged, reason)]
        case TripBreaker(agent_id=agent, reason=reason):
            if agent in controls.tripped_agents:
                return _refused(command, state, ctx, Refusal("already_tripped", f"{agent}'s breaker is open"))
            events, records = [BreakerTripped(agent_id=agent, reason=reason)], [
                switch_record(tenant, "breaker", agent, True, reason)]
        case ResetBreaker(agent_id=agent, reason=reason):
            events, records = [BreakerReset(agent_id=agent, reason=reason)], [
                switch_record(tenant, "breaker", agent, False, reason)]
        case OpenProviderBreaker(provider=provider, reason=reason):
            if provider in controls.open_providers:  # another worker tripped it first
                return _refused(command, state, ctx, Refusal("already_open", f"{provider}'s breaker is open"))
            events, records = [ProviderBreakerOpened(provider=provider, reason=reason)], [
                switch_record(tenant, "provider-breaker", provider, True, reason)]
        case CloseProviderBreaker(provider=provider, reason=reason):
            if provider not in controls.open_providers:
                return _refused(command, state, ctx, Refusal("not_open", f"{provider}'s breaker is closed"))
            events, records = [ProviderBreakerClosed(provider=provider, reason=reason)], [
                switch_record(tenant, "provider-breaker", provider, False, reason)]
        case SetPolicy(document=document):
            try:
                policy = parse_policy(document)
            except ValidationError as exc:
                return _refused(command, state, ctx, Refusal(exc.code, exc.message))
            canonical = json.dumps(json.loads(document), sort_keys=True)
            events, records = [PolicyPublished(policy_version=policy.version, document=canonical)], [
                policy_record(tenant, canonical)]
        case _:
            raise AssertionError(command.type)
    return Decision(to_events(command, events, version=state.version, now=ctx.now, authority=authority), records,
                    origin_type=command.type)


def _effect(command: Envelope, state: AggregateState, ctx: Context) -> Decision:
    role, refusal = authorize(command, ctx, rate_limit=False)
    if refusal is not None and refusal.code != "breaker_open":
        return _refused(command, state, ctx, refusal)
    settled = settle(command, state.effects)
    if isinstance(settled, tuple):
        return _refused(command, state, ctx, Refusal(*settled))
    return Decision(to_events(command, [settled], version=state.version, now=ctx.now,
                              authority=_authority(command.authority, role=role)), origin_type=command.type)


_ROUTES: dict[type[Payload], Callable[[Envelope, AggregateState, Context], Decision]] = {
    **dict.fromkeys(APPROVAL_COMMANDS, _approval),
    **dict.fromkeys(CONTROL_COMMANDS, _control),
    **dict.fromkeys(EFFECT_COMMANDS, _effect),
}


def _authority(base: Authority, **decided: str | None) -> Authority:
    """``base`` with what the processor decided.

    Memoised (the models are frozen): the same few authorities recur command after command,
    and building one cost more than the policy check that chose it.
    """
    return _authority_of(tuple({**base.__dict__, **decided}.items()))


@lru_cache(maxsize=4096)
def _authority_of(fields: tuple[tuple[str, Any], ...]) -> Authority:
    return Authority.model_construct(**dict(fields))


def _emit(command: Envelope, state: AggregateState, ctx: Context, payloads: list[Payload]) -> Decision:
    return Decision(to_events(command, payloads, version=state.version, now=ctx.now), origin_type=command.type)


def _refused(command: Envelope, state: AggregateState, ctx: Context, refusal: Refusal,
             authority: Authority | None = None) -> Decision:
    return Decision(to_events(command, [reject(command, refusal.code, refusal.reason)], version=state.version,
                              now=ctx.now, authority=authority), origin_type=command.type)
