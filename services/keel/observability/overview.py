"""What ``keel top`` shows, computed from two rounds of scrapes: pure, so it is tested on recorded text.

A ``Frame`` sums the same series the dashboard does, across every target that exports
them (two processors' decisions add up; tenant labels are the bounded ones, so a tenant
past the top N is part of ``other``). Totals are counts since each process started;
rates are per second over the last interval and ``None`` until two rounds exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

from keel.observability.scrape import Scrape, rate
from keel.observability.tenants import OTHER

WORK: Mapping[str, tuple[str, str]] = {
    "processor": ("keel_commands_received_total", "commands"),
    "relay": ("keel_outbox_published_total", "published"),
    "chainer": ("keel_audit_records_total", "records"),
    "projector": ("keel_projected_rows_total", "rows"),
    "effects": ("keel_effect_attempts_total", "calls"),
    "gateway": ("keel_gateway_requests_total", "requests"),
}
"""The counter that measures each service's work; any other service (the watchers) counts events read."""
WATCHER_WORK = ("keel_watcher_events_total", "events")


@dataclass(frozen=True)
class ServiceRow:
    """One published target: whether it answered, how fast it works, how far behind its consumers are."""

    service: str
    instance: str
    up: bool
    error: str
    rate: float | None
    unit: str
    lag: float | None
    """Records its consumer groups have not read yet (``None``: it consumes nothing, or has not reported)."""


@dataclass(frozen=True)
class TenantRow:
    """One tenant label's commands and decisions (totals since each processor started) and approvals now."""

    tenant: str
    rate: float | None
    accepted: float
    rejected: float
    parked: float
    waiting: float
    oldest_s: float | None


@dataclass(frozen=True)
class Frame:
    """One view of the platform."""

    services: list[ServiceRow]
    tenants: list[TenantRow]
    dead_letters: dict[str, float]
    dead_letter_rate: float | None
    breakers: list[tuple[str, str, float]]
    """(tenant, provider, how many are open) of every open provider breaker."""
    effects_held: float
    effects_settled_rate: float | None
    effects_retry_rate: float | None
    projection_lag_s: dict[str, float]
    approvals_overdue: float

    @property
    def down(self) -> list[ServiceRow]:
        return [row for row in self.services if not row.up]

    def as_json(self) -> dict[str, object]:
        """The frame as plain data (``keel top --json``)."""
        return asdict(self)


def frame(now: Iterable[Scrape], before: Iterable[Scrape] = ()) -> Frame:
    """The view of the latest round ``now``, with rates against the round ``before`` it."""
    current = list(now)
    previous = {scrape.key: scrape for scrape in before}
    answered = [scrape for scrape in current if scrape.samples is not None]
    pairs = [(scrape, previous.get(scrape.key)) for scrape in answered]
    return Frame(
        services=[_service(scrape, previous.get(scrape.key)) for scrape in current],
        tenants=_tenants(pairs),
        dead_letters=_by_label(answered, "keel_dead_letters_total", "code"),
        dead_letter_rate=_rate(pairs, "keel_dead_letters_total"),
        breakers=sorted((labels.get("tenant", ""), labels.get("provider", ""), value)
                        for scrape in answered for labels, value in _samples(scrape, "keel_effect_breaker_open")
                        if value > 0),
        effects_held=sum(_total(scrape, "keel_effects_buffered") for scrape in answered),
        effects_settled_rate=_rate(pairs, "keel_effect_outcomes_total"),
        effects_retry_rate=_rate(pairs, "keel_effect_retries_total"),
        projection_lag_s=_by_label(answered, "keel_projection_lag_seconds", "table", combine=max),
        approvals_overdue=sum(_total(scrape, "keel_approvals_overdue") for scrape in answered),
    )


def _service(scrape: Scrape, before: Scrape | None) -> ServiceRow:
    service, instance = scrape.key
    name, unit = WORK.get(service, WATCHER_WORK)
    if scrape.samples is None:
        return ServiceRow(service, instance, False, scrape.error, None, unit, None)
    lag = scrape.samples.total("keel_consumer_lag_records") if scrape.samples.has("keel_consumer_lag_records") \
        else None
    return ServiceRow(service, instance, True, "", rate(scrape, before, name), unit, lag)


def _tenants(pairs: list[tuple[Scrape, Scrape | None]]) -> list[TenantRow]:
    """A row per tenant label seen in commands, decisions or approvals; busiest first, ``other`` last."""
    answered = [scrape for scrape, _before in pairs]
    received = _by_label(answered, "keel_commands_received_total", "tenant")
    outcomes: dict[tuple[str, str], float] = {}
    for scrape in answered:
        for labels, value in _samples(scrape, "keel_decisions_total"):
            key = (labels.get("tenant", ""), labels.get("outcome", ""))
            outcomes[key] = outcomes.get(key, 0.0) + value
    waiting = _by_label(answered, "keel_approvals_pending", "tenant")
    oldest = _by_label(answered, "keel_approvals_oldest_pending_age_seconds", "tenant", combine=max)
    names = set(received) | {tenant for tenant, _outcome in outcomes} | set(waiting)
    rows = [TenantRow(tenant, _rate(pairs, "keel_commands_received_total", tenant=tenant),
                      outcomes.get((tenant, "accepted"), 0.0), outcomes.get((tenant, "rejected"), 0.0),
                      outcomes.get((tenant, "pending"), 0.0), waiting.get(tenant, 0.0),
                      oldest.get(tenant) if waiting.get(tenant) else None)
            for tenant in names]
    return sorted(rows, key=lambda row: (row.tenant == OTHER, -(row.rate or 0.0), -received.get(row.tenant, 0.0),
                                         row.tenant))


def _samples(scrape: Scrape, name: str) -> list[tuple[dict[str, str], float]]:
    return list(scrape.samples.select(name)) if scrape.samples is not None else []


def _total(scrape: Scrape, name: str) -> float:
    return scrape.samples.total(name) if scrape.samples is not None else 0.0


def _by_label(scrapes: Iterable[Scrape], name: str, label: str, combine: Callable[[float, float], float] | None = None
              ) -> dict[str, float]:
    """``name``'s values by one label over every target: summed, or ``combine``d (ages, lags)."""
    merged: dict[str, float] = {}
    for scrape in scrapes:
        for labels, value in _samples(scrape, name):
            key = labels.get(label, "")
            if key in merged:
                merged[key] = combine(merged[key], value) if combine is not None else merged[key] + value
            else:
                merged[key] = value
    return merged


def _rate(pairs: Iterable[tuple[Scrape, Scrape | None]], name: str, **match: str) -> float | None:
    """The summed rate of ``name`` over the targets that export it; ``None`` while none has two rounds.

    A target seen for the first time adds its rate from the next round on.
    """
    rates = [found for now, before in pairs if now.samples is not None and now.samples.has(name)
             and (found := rate(now, before, name, **match)) is not None]
    return sum(rates) if rates else None
