"""Security events of the gateway in the audit chains: the offender's, and the target's too.

A key of tenant B that sends a command claiming tenant A is an isolation violation. It is
recorded in B's chain, where B's operators look, and in A's, because A's owner must
learn that someone tried. A refused read outside the caller's projections is recorded in
the caller's chain. Each chain takes at most ``per_minute`` such receipts a minute from
one gateway process. What a full minute drops is counted and carried in the next receipt
(``suppressed_before``), so nobody can flood a chain and the count is never lost. A
claimed tenant that is not registered gets nothing: a made-up name must not create a chain.
Receipts are appended from worker threads; a Kafka outage is logged, never raised.

A read that shows personal data in plaintext (a key with the ``personal_data`` role) is
recorded as ``PersonalDataRead`` in the chain of the tenant whose data it is, on behalf of
its subject (``keel.trust.reveal``). Those receipts take no budget: the gateway shows the
plaintext only once the receipt is acknowledged, so a budget would limit the reads, and only
keys granted that role cause them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from keel.config import Settings
from keel.errors import KeelError
from keel.security.keys import KeyStore
from keel.trust.reveal import PERSONAL_DATA_ROLE, Disclosure, record_reads
from keel.trust.store import append_receipt

log = logging.getLogger("keel.gateway")

PER_MINUTE = 30
TENANTS_CACHE_S = 60.0
_MAX_CHAINS = 10_000  # budgets kept at once; older minutes are dropped beyond it


@dataclass
class _Budget:
    minute: int
    used: int = 0
    suppressed: int = 0


class SecurityLog:
    """Appends security receipts to tenants' audit chains, at most ``per_minute`` per chain."""

    def __init__(self, settings: Settings, keys: KeyStore, *, per_minute: int = PER_MINUTE,
                 clock: Callable[[], float] = time.time,
                 append: Callable[..., object] = append_receipt) -> None:
        self._settings, self._keys, self._per_minute, self._clock = settings, keys, per_minute, clock
        self._append = append
        self._lock = threading.Lock()
        self._budgets: dict[str, _Budget] = {}
        self._tenants: tuple[float, frozenset[str]] | None = None  # (when fetched, which)

    def isolation_violation(self, tenant: str, actor: str, details: dict[str, str | None]) -> None:
        """Record a command of ``tenant``'s key that claimed another tenant, in both chains."""
        self.record(tenant, "IsolationViolation", actor, details)
        claimed = details.get("claimed_tenant")
        if claimed and claimed != tenant and claimed in self._registered():
            self.record(claimed, "IsolationViolation", actor, {**details, "offender_tenant": tenant})

    def read_refused(self, tenant: str, actor: str, error: KeelError, sql: str) -> None:
        """Record a query of ``tenant``'s key refused for reaching outside its projections."""
        self.record(tenant, "ReadRefused", actor, {"code": error.code, "reason": error.message, "sql": sql[:1000]})

    def personal_data_read(self, actor: str, reads: Sequence[Disclosure], via: str) -> bool:
        """Record reads that showed personal data in plaintext, in each tenant's chain; whether Kafka took them."""
        try:
            record_reads(self._settings, reads, actor=actor, via=via, authority={"role": PERSONAL_DATA_ROLE})
        except Exception:  # noqa: BLE001 - logged: the caller then shows no plaintext
            log.exception("could not record a personal data read in the audit chain")
            return False
        return True

    def record(self, tenant: str, kind: str, actor: str, details: dict[str, Any]) -> bool:
        """Append one receipt to ``tenant``'s chain unless its budget is spent; whether it was appended."""
        carried = self._spend(tenant)
        if carried is None:
            return False
        try:
            self._append(self._settings, tenant=tenant, type=kind, actor=actor,
                         details={**details, "suppressed_before": carried} if carried else details)
        except Exception:  # noqa: BLE001 - logged: the gateway's own records keep the refusal
            log.exception("could not append a %s receipt to the audit chain", kind, extra={"tenant_id": tenant})
            return False
        return True

    def _spend(self, tenant: str) -> int | None:
        """``None`` when ``tenant``'s chain has had its receipts this minute; else the count dropped before."""
        minute = int(self._clock() // 60)
        with self._lock:
            budget = self._budgets.get(tenant)
            if budget is None or budget.minute != minute:
                if len(self._budgets) >= _MAX_CHAINS:
                    self._budgets = {t: b for t, b in self._budgets.items() if b.minute == minute or b.suppressed}
                carried = budget.suppressed if budget is not None else 0
                budget = self._budgets[tenant] = _Budget(minute, suppressed=carried)
            if budget.used >= self._per_minute:
                budget.suppressed += 1
                return None
            budget.used += 1
            carried, budget.suppressed = budget.suppressed, 0
            return carried

    def _registered(self) -> frozenset[str]:
        """The registered tenants, looked up at most every ``TENANTS_CACHE_S``."""
        if self._tenants is None or self._clock() - self._tenants[0] > TENANTS_CACHE_S:
            self._tenants = (self._clock(), frozenset(self._keys.tenants()))
        return self._tenants[1]
