"""Recording a batch loop's work once per batch: the hot paths' only contact with the metrics.

``LoopMetrics`` resolves a loop's labelled children once, so a batch costs a few
histogram observations and no label lookups. ``DecisionTally`` collects the processor's
outcomes in plain dict counts while it decides (one increment per command) and turns
them into labelled counters once the batch has committed: an aborted batch is decided
again, and counting it then would count it twice.
"""

from __future__ import annotations

from keel.observability.metrics import (
    BATCH_RECORDS,
    BATCH_SECONDS,
    COMMANDS,
    COMMIT_SECONDS,
    DEAD_LETTERS,
    DECISIONS,
    DUPLICATES,
    EVENTS,
    TRANSACTION_RECORDS,
    TRANSACTIONS,
    tenant_label,
)


class LoopMetrics:
    """The batch and transaction series of one loop (``processor``, ``chainer``, ``relay`` …)."""

    def __init__(self, loop: str) -> None:
        self.records = BATCH_RECORDS.labels(loop)
        self.seconds = BATCH_SECONDS.labels(loop)
        self.produced = TRANSACTION_RECORDS.labels(loop)
        self.commit = COMMIT_SECONDS.labels(loop)
        self.committed = TRANSACTIONS.labels(loop, "committed")
        self.aborted = TRANSACTIONS.labels(loop, "aborted")

    def batch(self, records: int, seconds: float) -> None:
        """A batch of ``records`` done in ``seconds`` (no transaction: the relay, the projector)."""
        self.records.observe(records)
        self.seconds.observe(seconds)

    def transaction(self, records: int, produced: int, seconds: float, commit_s: float) -> None:
        """A batch committed in one transaction: consumed, produced, whole time and commit time."""
        self.batch(records, seconds)
        self.produced.observe(produced)
        self.commit.observe(commit_s)
        self.committed.inc()


class DecisionTally:
    """One batch's outcomes, counted per tenant; ``flush`` after the commit."""

    __slots__ = ("decisions", "duplicates", "dead", "events")

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.duplicates: dict[str, int] = {}
        self.dead: dict[str, int] = {}
        self.events: dict[str, int] = {}

    def decided(self, tenant: str, outcome: str, code: str, events: int) -> None:
        key = (tenant, outcome, code)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        if events:
            self.events[tenant] = self.events.get(tenant, 0) + events

    def duplicate(self, tenant: str) -> None:
        self.duplicates[tenant] = self.duplicates.get(tenant, 0) + 1

    def dead_letter(self, code: str) -> None:
        self.dead[code] = self.dead.get(code, 0) + 1

    def flush(self) -> None:
        """Add the batch to the counters: one bounded label per tenant, looked up once."""
        volume: dict[str, int] = dict(self.duplicates)
        for (tenant, _outcome, _code), count in self.decisions.items():
            volume[tenant] = volume.get(tenant, 0) + count
        # the busiest first: free labels go to the tenants with the most traffic
        labels = {tenant: tenant_label(tenant, count)
                  for tenant, count in sorted(volume.items(), key=lambda item: -item[1])}
        for tenant, count in volume.items():
            COMMANDS.labels(labels[tenant]).inc(count)
        for (tenant, outcome, code), count in self.decisions.items():
            DECISIONS.labels(labels[tenant], outcome, code).inc(count)
        for tenant, count in self.duplicates.items():
            DUPLICATES.labels(labels[tenant]).inc(count)
        for tenant, count in self.events.items():
            EVENTS.labels(labels.get(tenant) or tenant_label(tenant, 0)).inc(count)
        for code, count in self.dead.items():
            DEAD_LETTERS.labels(code).inc(count)
