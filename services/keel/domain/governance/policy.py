"""Tenant policy as data: roles and grants (RBAC), rules, rate limits, approval deadline.

A policy is a JSON document published with ``SetPolicy`` (or ``keel policy apply FILE``)
and carried on the compacted controls topic, so every processor worker switches to a new
version without a restart. Rules are checked in order; the first that matches decides:
allow, confirm (by the on-behalf-of subject), approve (by an approver role) or deny.
Every decision names the policy version and the rule that made it.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

import pydantic
from pydantic import Field

from keel.domain.envelope import Actor, ActorKind, Envelope, Frozen
from keel.errors import ValidationError

DEFAULT_RULE = "default"
SYSTEM_ACTOR = Actor(kind=ActorKind.SERVICE, id="keel-system")
SYSTEM_PREFIX = "keel-"
"""Service actors named keel-* are the platform (ops tools, watchers); no tenant key may claim one."""


def is_system(actor: Actor) -> bool:
    """Whether ``actor`` is one of the platform's own service actors."""
    return actor.kind is ActorKind.SERVICE and actor.id.startswith(SYSTEM_PREFIX)
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le,
    "eq": operator.eq, "ne": operator.ne, "in": lambda value, options: value in options,
}


class Outcome(StrEnum):
    ALLOW = "allow"
    CONFIRM = "confirm"
    APPROVE = "approve"
    DENY = "deny"


class Match(Frozen):
    """Conditions of a rule; all given ones must hold. Missing conditions match anything."""

    command_types: frozenset[str] | None = None
    actor_kinds: frozenset[ActorKind] | None = None
    actor_ids: frozenset[str] | None = None
    payload: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="field -> {gt|gte|lt|lte|eq|ne|in: value}")
    confidence_below: float | None = Field(
        default=None, description="Matches when the agent reported a confidence below this.")
    hours_utc: tuple[int, int] | None = Field(default=None, description="[start, end) hours, UTC.")
    weekdays: frozenset[int] | None = Field(default=None, description="0 = Monday.")

    def holds(self, command: Envelope, now: datetime) -> bool:
        """Whether every condition holds for ``command`` at ``now``."""
        payload = command.payload
        if self.command_types is not None and command.type not in self.command_types:
            return False
        if self.actor_kinds is not None and command.actor.kind not in self.actor_kinds:
            return False
        if self.actor_ids is not None and command.actor.id not in self.actor_ids:
            return False
        for field, conditions in self.payload.items():
            value = getattr(payload, field, None)
            if value is None:
                return False
            for op, arg in conditions.items():  # a loop, not ``all`` over a generator: a rule per command
                if not _OPERATORS[op](value, arg):
                    return False
        if self.confidence_below is not None:
            confidence = getattr(payload, "confidence", None)
            if confidence is None or confidence >= self.confidence_below:
                return False
        if self.hours_utc is not None:
            start, end = self.hours_utc
            if not (start <= now.hour < end if start <= end else now.hour >= start or now.hour < end):
                return False
        return self.weekdays is None or now.weekday() in self.weekdays


class Rule(Frozen):
    name: str = Field(min_length=1, max_length=200)
    match: Match = Match()
    decision: Outcome


class RateLimits(Frozen):
    tenant_per_minute: int | None = Field(default=None, ge=1)
    actor_per_minute: int | None = Field(default=None, ge=1)


class Policy(Frozen):
    """One version of a tenant's policy."""

    version: str = Field(min_length=1, max_length=100)
    roles: dict[str, frozenset[str]] = Field(description="role -> command types it may send ('*' = all)")
    grants: dict[str, frozenset[str]] = Field(description="'kind:id' (or '*') -> roles")
    approver_roles: frozenset[str] = frozenset({"admin"})
    rules: tuple[Rule, ...] = ()
    default: Outcome = Outcome.ALLOW
    rate_limits: RateLimits = RateLimits()
    approval_ttl_seconds: int = Field(default=86_400, ge=1)

    def roles_of(self, actor: Actor) -> frozenset[str]:
        """Every role granted to ``actor`` (directly or through '*')."""
        return self.grants.get(f"{actor.kind}:{actor.id}", frozenset()) | self.grants.get("*", frozenset())

    def permitting_role(self, actor: Actor, command_type: str) -> str | None:
        """The first (sorted) role of ``actor`` that may send ``command_type``, if any."""
        memo = self._memo().roles
        key = (actor.kind, actor.id, command_type)
        if key not in memo:
            if len(memo) >= _MEMO_SIZE:  # many actors: start over rather than grow without bound
                memo.clear()
            memo[key] = next((role for role in sorted(self.roles_of(actor))
                              if "*" in (allowed := self.roles.get(role, frozenset())) or command_type in allowed),
                             None)
        return memo[key]

    def may_approve(self, actor: Actor) -> str | None:
        """The approver role ``actor`` holds, if any."""
        held = sorted(self.roles_of(actor) & self.approver_roles)
        return held[0] if held else None

    def evaluate(self, command: Envelope, now: datetime) -> tuple[Outcome, str]:
        """The outcome for ``command`` and the name of the rule that decided it."""
        rules = self._memo().rules.get(command.type)
        if rules is None:  # only the rules that can match this type (few; the type set is bounded)
            rules = self._memo().rules[command.type] = tuple(
                rule for rule in self.rules
                if rule.match.command_types is None or command.type in rule.match.command_types)
        for rule in rules:
            if rule.match.holds(command, now):
                return rule.decision, rule.name
        return self.default, DEFAULT_RULE

    def _memo(self) -> _Memo:
        """This policy's memoised answers (it is immutable, so they hold as long as it does).

        Kept in the instance's ``__dict__`` beside the fields, which pydantic's equality and
        serialisation ignore; a copy (``model_copy``) brings its source's memo along, so the
        memo names the policy it belongs to and a copy starts its own.
        """
        memo = self.__dict__.get("_keel_memo")
        if memo is None or memo.policy is not self:
            memo = self.__dict__["_keel_memo"] = _Memo(self)
        return cast(_Memo, memo)


_MEMO_SIZE = 10_000


class _Memo:
    """What a policy answered before: the permitting role per (actor, command type), the
    rules that can match per command type."""

    __slots__ = ("policy", "roles", "rules")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.roles: dict[tuple[ActorKind, str, str], str | None] = {}
        self.rules: dict[str, tuple[Rule, ...]] = {}


def parse_policy(document: str) -> Policy:
    """A policy from its JSON document; errors name the offending field."""
    try:
        return Policy.model_validate(json.loads(document))
    except json.JSONDecodeError as exc:
        raise ValidationError(f"policy is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                              code="malformed_policy") from exc
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(p) for p in first["loc"])
        raise ValidationError(f"policy {path}: {first['msg']}", code="malformed_policy", field=path) from exc


def builtin_policy(rules: tuple[Rule, ...]) -> Policy:
    """What applies to a tenant until it publishes its own: anyone may act, under ``rules``
    (the registered domains' defaults). Its version names its content."""
    document = json.dumps([r.model_dump() for r in rules], sort_keys=True,
                          default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v))
    digest = hashlib.sha256(document.encode())
    return Policy(version=f"builtin-{digest.hexdigest()[:8]}", roles={"member": frozenset({"*"})},
                  grants={"*": frozenset({"member"})}, rules=rules)
