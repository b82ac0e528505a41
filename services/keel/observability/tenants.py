"""Bounded ``tenant`` labels: an allow-list, or the busiest N tenants, and ``other`` for the rest.

Every labelled series costs the Prometheus server memory per label value, so a tenant id
cannot become a label as such: one noisy tenant, or a thousand small ones, would create
series without bound. With an allow-list (``KEEL_METRICS_TENANTS``) exactly those tenants
are named. Without one, each process names at most ``top`` tenants, chosen by volume:

- Volumes are counted in a Space-Saving summary (Metwally et al., 2005) of ``capacity``
  entries, so the memory is bounded however many tenants pass; each entry keeps an
  over-estimate and its error, so ``count - error`` is a guaranteed lower bound.
- While fewer than ``top`` tenants are named, a tenant is named when first seen.
- Once full, a tenant replaces the smallest named one only when its guaranteed volume is
  at least ``displace_factor`` times the other's: a noisy newcomer gets its label, and a
  crowd of equal small tenants cannot churn labels (each change would need a doubling).
  The replaced tenant's series are removed (``on_evict``), so the number of series stays
  ``top + 1``; its later volume counts under ``other``.

Names are per process: set the allow-list for labels that agree across services.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

OTHER = "other"


def parse_allow_list(raw: str) -> frozenset[str]:
    """The tenants of a comma-separated ``KEEL_METRICS_TENANTS`` value (blank entries dropped)."""
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


class TenantLabels:
    """Maps tenant ids to a bounded set of label values (thread-safe)."""

    def __init__(self, *, allow: Iterable[str] = (), top: int = 20, capacity: int | None = None,
                 displace_factor: float = 2.0) -> None:
        self.allow = frozenset(allow)
        self.top = top
        self.capacity = max(capacity or 8 * top, top, 1)
        self.displace_factor = displace_factor
        self._counts: dict[str, int] = {}  # Space-Saving entries: tenant -> over-estimated volume
        self._errors: dict[str, int] = {}  # tenant -> how much of its count may belong to others
        self._named: set[str] = set()
        self._evicted: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    @property
    def named(self) -> frozenset[str]:
        """The tenants that have a label of their own now."""
        return self.allow if self.allow else frozenset(self._named)

    def on_evict(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(tenant)`` when a tenant loses its label (to remove its series)."""
        self._evicted.append(callback)

    def label(self, tenant: str, volume: int = 1) -> str:
        """The label value for ``tenant``, counting ``volume`` more of its traffic (call once per batch)."""
        if self.allow:
            return tenant if tenant in self.allow else OTHER
        if self.top == 0:
            return OTHER
        with self._lock:
            self._count(tenant, volume)
            if tenant in self._named:
                return tenant
            if len(self._named) < self.top:
                self._named.add(tenant)
                return tenant
            smallest = min(self._named, key=lambda t: self._counts.get(t, 0))
            guaranteed = self._counts[tenant] - self._errors[tenant]
            if guaranteed < self.displace_factor * max(self._counts.get(smallest, 0), 1):
                return OTHER
            self._named.discard(smallest)
            self._named.add(tenant)
        for callback in self._evicted:
            callback(smallest)
        return tenant

    def _count(self, tenant: str, volume: int) -> None:
        if tenant in self._counts:
            self._counts[tenant] += volume
            return
        if len(self._counts) >= self.capacity:  # replace the least counted entry that has no label
            victims = [t for t in self._counts if t not in self._named]
            if victims:
                victim = min(victims, key=self._counts.__getitem__)
                floor = self._counts.pop(victim)
                self._errors.pop(victim)
                self._counts[tenant], self._errors[tenant] = floor + volume, floor
                return
        self._counts[tenant], self._errors[tenant] = volume, 0
