"""What a key may do, and what governance would say to one command: ``GET /v1/actions`` and
``POST /v1/explain``.

Pure: the gateway passes the tenant's current controls (folded from the controls topic)
and the clock. An agent asks before it acts, so it need not learn the policy from refusals.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from keel.contracts.jsonschema import LongBounded
from keel.domain.envelope import Actor, Envelope
from keel.domain.governance.controls import TenantControls
from keel.domain.governance.pipeline import Context, authorize
from keel.domain.governance.policy import Outcome, Policy
from keel.domain.governance.ratelimit import RateLimiter
from keel.domains.registry import current
from keel.gateway.errors import NotExplainable


class Action(BaseModel):
    """A command type a key may send, with what an agent needs to fill it in."""

    model_config = ConfigDict(frozen=True, validate_by_name=True, serialize_by_alias=True)

    type: str = Field(description="The envelope's type: a command type the key may send.")
    domain: str
    aggregate: str = Field(description="The kind of thing it acts on; aggregate_id names which one.")
    description: str = Field(description="The command model's docstring.")
    id_pattern: str = Field(description="The aggregate ids it may address (a full match).")
    json_schema: dict[str, Any] = Field(alias="schema", description="JSON schema of the payload.")


class ActionList(BaseModel):
    """The body of ``GET /v1/actions``."""

    model_config = ConfigDict(frozen=True)

    actions: list[Action]


class Explanation(BaseModel):
    """What governance would decide for a command now, before the domain's own ``decide``."""

    model_config = ConfigDict(frozen=True)

    outcome: Literal["allow", "confirm", "approve", "deny", "refused"] = Field(
        description="refused: a guardrail (role, kill switch, breaker) stops it before the policy's rules.")
    rule: str | None = Field(description="The policy rule that decided, if the rules were reached.")
    policy_version: str
    code: str | None = Field(description="The rejection code the processor would record (no_role, "
                                         "kill_switch, breaker_open, no_subject, policy_denied); null if none.")
    reason: str


@cache
def catalog() -> tuple[Action, ...]:
    """Every registered domain's commands, described once per process (schemas cost to build)."""
    return tuple(Action(type=cls.__name__, domain=domain.name, aggregate=aggregate.name,
                        description=(cls.__doc__ or "").strip(), id_pattern=aggregate.id_pattern,
                        schema=cls.model_json_schema(schema_generator=LongBounded))
                 for domain in current().domains for aggregate in domain.aggregates for cls in aggregate.commands)


def allowed_actions(policy: Policy, actor: Actor) -> list[Action]:
    """The domains' command types a role of ``actor`` may send under ``policy``."""
    return [action for action in catalog() if policy.permitting_role(actor, action.type) is not None]


def explain(command: Envelope, controls: TenantControls, now: datetime) -> Explanation:
    """The processor's governance of ``command`` as a dry run: roles, kill switches and the
    agent's breaker, then the policy's rules. Rate limits are not consulted: their buckets
    live in the processor workers, and asking must not spend them.
    """
    if command.type not in current().aggregate_of:
        raise NotExplainable(f"{command.type} is one of Keel's own commands; explain covers the domains' "
                             "commands", field="type")
    policy = controls.policy

    def answer(outcome: Literal["allow", "confirm", "approve", "deny", "refused"], rule: str | None,
               code: str | None, reason: str) -> Explanation:
        return Explanation(outcome=outcome, rule=rule, policy_version=policy.version, code=code, reason=reason)

    _, refusal = authorize(command, Context(controls, RateLimiter(), now), rate_limit=False)
    if refusal is not None:
        return answer("refused", None, refusal.code, refusal.reason)
    outcome, rule = policy.evaluate(command, now)
    if outcome is Outcome.DENY:
        return answer("deny", rule, "policy_denied", f"policy rule {rule!r} denies it")
    if outcome is Outcome.CONFIRM:
        if not command.on_behalf_of:
            return answer("refused", rule, "no_subject",
                          f"policy rule {rule!r} needs the on-behalf-of subject to confirm, and there is none")
        return answer("confirm", rule, None, f"policy rule {rule!r} waits for {command.on_behalf_of} to confirm it")
    if outcome is Outcome.APPROVE:
        roles = ", ".join(sorted(policy.approver_roles))
        return answer("approve", rule, None, f"policy rule {rule!r} waits for an approver ({roles}) to approve it")
    return answer("allow", rule, None, f"policy rule {rule!r} allows it; the {command.type} then goes to its "
                                       "aggregate, which may still reject it")
