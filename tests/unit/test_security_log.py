"""Security receipts per chain: a bounded number a minute, and the dropped ones counted, never lost."""

from __future__ import annotations

from typing import Any

from keel.config import Settings
from keel.gateway.security_log import SecurityLog


class Registry:
    def __init__(self, *tenants: str) -> None:
        self.known, self.lookups = list(tenants), 0

    def tenants(self) -> list[str]:
        self.lookups += 1
        return self.known


def log_with(now: list[float], appended: list[dict[str, Any]], *tenants: str) -> SecurityLog:
    return SecurityLog(Settings(), Registry(*tenants), per_minute=2, clock=lambda: now[0],  # type: ignore[arg-type]
                       append=lambda _settings, **receipt: appended.append(receipt))


def test_a_chain_takes_its_budget_a_minute_and_the_next_receipt_carries_what_was_dropped() -> None:
    now, appended = [600.0], list[dict[str, Any]]()
    log = log_with(now, appended)
    kept = [log.record("acme", "IsolationViolation", "agent:x", {"n": i}) for i in range(5)]
    assert kept == [True, True, False, False, False]
    assert log.record("globex", "IsolationViolation", "agent:x", {}) is True  # budgets are per chain
    now[0] += 60
    assert log.record("acme", "IsolationViolation", "agent:x", {"n": 5}) is True
    assert [r["details"] for r in appended if r["tenant"] == "acme"] == [
        {"n": 0}, {"n": 1}, {"n": 5, "suppressed_before": 3}]


def test_a_violation_reaches_a_registered_target_and_never_a_made_up_one() -> None:
    now, appended = [0.0], list[dict[str, Any]]()
    log = log_with(now, appended, "acme", "globex")
    log.isolation_violation("acme", "agent:x", {"claimed_tenant": "globex"})
    log.isolation_violation("acme", "agent:x", {"claimed_tenant": "initech"})
    assert [(r["tenant"], r["details"].get("offender_tenant")) for r in appended] == [
        ("acme", None), ("globex", "acme"), ("acme", None)]
