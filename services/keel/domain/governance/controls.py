"""Guardrail controls per tenant: the policy in force, kill switches, tripped agent breakers
and open provider breakers.

Controls travel on the compacted controls topic as ``key -> JSON`` records (a tombstone
clears a switch), written by the processor in the same transaction as the event that
changed them, and read by every worker, so a switch thrown on one partition applies to
all of them at once. "At once" means from the next batch: a command decided in the same
transaction as the switch, on another partition, still sees the previous controls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache

from keel.domain.governance.policy import Policy, builtin_policy, parse_policy
from keel.domains.registry import current


@cache
def default_policy() -> Policy:
    """The built-in policy with every registered domain's default rules, in registry order."""
    return builtin_policy(tuple(rule for domain in current().domains for rule in domain.policy))


@dataclass
class TenantControls:
    """What currently constrains one tenant."""

    policy: Policy = field(default_factory=default_policy)
    killed_agents: set[str] = field(default_factory=set)
    killed_command_types: set[str] = field(default_factory=set)
    tripped_agents: set[str] = field(default_factory=set)
    open_providers: set[str] = field(default_factory=set)
    """Providers whose breaker is open: their effects wait instead of calling them."""


@dataclass
class Controls:
    """Every tenant's controls, as folded from the controls topic."""

    tenants: dict[str, TenantControls] = field(default_factory=dict)

    def of(self, tenant_id: str) -> TenantControls:
        """The tenant's controls (defaults when it has none)."""
        return self.tenants.get(tenant_id) or TenantControls()

    def apply(self, key: str, value: bytes | None) -> None:
        """Fold one controls-topic record; ``None`` is a tombstone."""
        tenant_id, kind, *rest = key.split("/", 2)
        controls = self.tenants.setdefault(tenant_id, TenantControls())
        target = rest[0] if rest else ""
        if kind == "policy":
            controls.policy = parse_policy(value.decode()) if value else default_policy()
        elif kind in ("kill-agent", "kill-command_type", "breaker", "provider-breaker"):
            chosen = {"kill-agent": controls.killed_agents,
                      "kill-command_type": controls.killed_command_types,
                      "breaker": controls.tripped_agents,
                      "provider-breaker": controls.open_providers}[kind]
            (chosen.add if value else chosen.discard)(target)


def policy_record(tenant_id: str, document: str) -> tuple[str, bytes]:
    """The controls record that puts a policy in force."""
    return f"{tenant_id}/policy", document.encode()


def switch_record(tenant_id: str, kind: str, target: str, on: bool, reason: str) -> tuple[str, bytes | None]:
    """The controls record of a kill switch (``kill-agent``/``kill-command_type``) or breaker
    (``breaker`` of an agent, ``provider-breaker`` of an effect provider)."""
    value = json.dumps({"reason": reason}).encode() if on else None
    return f"{tenant_id}/{kind}/{target}", value
