"""Every ``keel_*`` series, defined once in prometheus-client's default registry.

One module names them all, so the dashboard and alert rules can be checked against the
registry (``exported_names``) and a service only exports what it touches: a series with
labels appears once a value is recorded. A process's target labels (``service``,
``instance``) come from the scrape config, not from the series. Hot loops record once per
batch (``keel.observability.batches``), never per record.

Tenant labels go through ``tenant_label`` (``keel.observability.tenants``): bounded, with
``other`` for the rest; a tenant that loses its label has its series removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from keel.observability.tenants import TenantLabels

RECORD_BUCKETS = (1, 5, 10, 50, 100, 500, 1000, 2500, 5000, 10_000, 20_000)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# -- commands and decisions (the processor) ------------------------------------------------
COMMANDS = Counter("keel_commands_received", "Commands the processor read and identified, per tenant "
                   "(duplicates included; dead letters are counted apart).", ["tenant"])
DECISIONS = Counter("keel_decisions", "Commands decided, by outcome (accepted, rejected, pending: waiting for "
                    "an approval or confirmation) and rejection code.", ["tenant", "outcome", "code"])
DUPLICATES = Counter("keel_duplicate_commands", "Commands acknowledged as already decided.", ["tenant"])
DEAD_LETTERS = Counter("keel_dead_letters", "Records written to the dead-letter topic, by error code.", ["code"])
EVENTS = Counter("keel_events_written", "Events the processor wrote.", ["tenant"])

# -- batches and transactions (processor, chainer, relay, projector) -----------------------
BATCH_RECORDS = Histogram("keel_batch_records", "Records consumed per batch.", ["loop"], buckets=RECORD_BUCKETS)
BATCH_SECONDS = Histogram("keel_batch_duration_seconds", "Time from a batch's first record read to its commit.",
                          ["loop"], buckets=SECONDS_BUCKETS)
TRANSACTION_RECORDS = Histogram("keel_transaction_records", "Records produced per Kafka transaction.", ["loop"],
                                buckets=RECORD_BUCKETS)
COMMIT_SECONDS = Histogram("keel_transaction_commit_duration_seconds", "Time commit_transaction took.", ["loop"],
                           buckets=SECONDS_BUCKETS)
TRANSACTIONS = Counter("keel_transactions", "Kafka transactions ended, by outcome (committed, aborted).",
                       ["loop", "outcome"])

# -- consumer lag (every confluent-kafka consumer group; keel.observability.lag) -----------
CONSUMER_LAG = Gauge("keel_consumer_lag_records", "Records on a partition past the consumer's position "
                     "(read_committed: up to the last stable offset).", ["group", "topic", "partition"])

# -- group membership (the members that own partitions: processor, chainer, effect workers) -
REBALANCES = Counter("keel_partition_rebalances", "Changes of the partitions a consumer group member owns, by "
                     "change: assigned, revoked (handed over cleanly), lost (taken away, e.g. after a missed "
                     "session).", ["loop", "change"])
OWNED_PARTITIONS = Gauge("keel_owned_partitions", "Partitions a consumer group member owns (several effect "
                         "workers share a process).", ["loop", "member"])


def partitions_changed(loop: str, member: str, change: str, moved: int, owned: int) -> None:
    """Count a change of ``moved`` partitions of ``loop``'s ``member``, which now owns ``owned``.

    A cooperative rebalance calls every member back, most with no partition of theirs moved:
    those are not counted, so the counter says how often a member's work moved.
    """
    if moved:
        REBALANCES.labels(loop, change).inc()
    OWNED_PARTITIONS.labels(loop, member).set(owned)


# -- outbox relay --------------------------------------------------------------------------
RELAYED = Counter("keel_outbox_published", "Outbox rows the relay published and marked.")
RELAY_FAILED = Counter("keel_outbox_publish_failures", "Outbox rows Kafka did not acknowledge (sent again).")
RELAY_LEASE = Gauge("keel_outbox_lease_held", "1 while this relay holds the outbox lease and publishes.")

# -- effects -------------------------------------------------------------------------------
EFFECT_OUTCOMES = Counter("keel_effect_outcomes", "Effects settled, by outcome (succeeded, failed, cancelled).",
                          ["tenant", "provider", "outcome"])
EFFECT_ATTEMPTS = Counter("keel_effect_attempts", "Effect handler calls, by provider.", ["provider"])
EFFECT_RETRIES = Counter("keel_effect_retries", "Attempts that failed retryably and were retried.", ["provider"])

# -- projection ----------------------------------------------------------------------------
PROJECTED = Counter("keel_projected_rows", "Rows written into ClickHouse, by table.", ["table"])
PROJECTION_LAG = Gauge("keel_projection_lag_seconds", "Age of the newest record of the last stored batch when "
                       "it was stored (0 once the projector has read to the end).", ["table"])
UNDECODABLE = Counter("keel_projection_undecodable_records", "Records the projector skipped as undecodable.",
                      ["table"])

# -- audit chain ---------------------------------------------------------------------------
CHAINED = Counter("keel_audit_records", "Audit records appended to tenants' hash chains.")
CHECKPOINTS = Counter("keel_audit_checkpoints", "Signed checkpoints written.")
LAST_CHECKPOINT = Gauge("keel_audit_last_checkpoint_timestamp_seconds",
                        "When this chainer last signed a checkpoint (Unix time).")

# -- watchers ------------------------------------------------------------------------------
WATCHER_EVENTS = Counter("keel_watcher_events", "Events a watcher read.", ["watcher"])
WATCHER_COMMANDS = Counter("keel_watcher_commands_sent", "Commands a watcher sent, by type.", ["watcher", "type"])

Values = dict[tuple[str, ...], float]


class SnapshotGauge(Collector):
    """A labelled gauge whose values a service computes whole (each scrape reads the latest).

    For state that shrinks as well as grows (pending approvals, open breakers, chain
    heads): a plain ``Gauge`` would keep the label of a tenant whose last approval ended.
    ``source`` is read at scrape time; ``set`` replaces a stored snapshot.
    """

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.source: Callable[[], Values] | None = None
        self._values: Values = {}
        REGISTRY.register(self)

    def set(self, values: Values) -> None:
        """Replace every value (one assignment: a scrape sees the old or the new snapshot)."""
        self._values = dict(values)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        values = self.source() if self.source is not None else self._values
        for labels, value in values.items():
            family.add_metric(list(labels), value)
        yield family


APPROVALS_PENDING = SnapshotGauge("keel_approvals_pending", "Commands waiting for an approval or confirmation.",
                                  ["tenant"])
APPROVAL_OLDEST_AGE = SnapshotGauge("keel_approvals_oldest_pending_age_seconds",
                                    "How long the oldest pending approval has waited.", ["tenant"])
APPROVALS_OVERDUE = SnapshotGauge("keel_approvals_overdue", "Pending approvals past their deadline (the "
                                  "watcher should have expired them).", ["tenant"])
BREAKERS_OPEN = SnapshotGauge("keel_effect_breaker_open", "1 while a tenant's provider breaker is open (an "
                              "`other` tenant: how many are).", ["tenant", "provider"])
EFFECTS_BUFFERED = SnapshotGauge("keel_effects_buffered", "Effects a worker holds read but not settled.",
                                 ["worker"])
CHAIN_HEAD = SnapshotGauge("keel_audit_chain_head", "Sequence number of a tenant's audit chain head "
                           "(`other`: the highest).", ["tenant"])
UNSIGNED = SnapshotGauge("keel_audit_unsigned_records", "Audit records past the tenant's last signed checkpoint.",
                         ["tenant"])
CHECKPOINT_AGE = SnapshotGauge("keel_audit_checkpoint_age_seconds", "How long a tenant's newest audit records have "
                               "waited for a signed checkpoint (0 when its head is signed; `other`: the longest).",
                               ["tenant"])

TENANTS = TenantLabels()
"""The process's tenant labels; ``keel.observability.exporter.start`` configures it from the settings."""
_TENANT_LABELLED: tuple[tuple[MetricWrapperBase, int], ...] = (
    (COMMANDS, 0), (DECISIONS, 0), (DUPLICATES, 0), (EVENTS, 0), (EFFECT_OUTCOMES, 0))


def tenant_label(tenant: str, volume: int = 1) -> str:
    """``tenant``'s bounded label value (``volume``: its traffic since the last call)."""
    return TENANTS.label(tenant, volume)


def use_tenant_labels(labels: TenantLabels) -> None:
    """Make ``labels`` the process's tenant labels; an evicted tenant's series are removed."""
    global TENANTS
    TENANTS = labels
    labels.on_evict(_remove_series)


def _remove_series(tenant: str) -> None:
    for metric, position in _TENANT_LABELLED:
        for labels in [key for key in list(metric._metrics) if key[position] == tenant]:  # noqa: SLF001
            metric.remove(*labels)


use_tenant_labels(TENANTS)


def exported_names() -> set[str]:
    """Every sample name the ``keel_*`` series can export (``_total``, ``_bucket`` … included)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "_created")}
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("keel_"):
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def known_label(tenant: str) -> str:
    """``tenant``'s label without counting traffic (for state read at scrape time): named while labels are free."""
    return TENANTS.label(tenant, 0)


def bounded(values: Iterable[tuple[str, float]], combine: Callable[[float, float], float]) -> Values:
    """Per-tenant ``values`` under bounded labels, those sharing ``other`` merged by ``combine``."""
    merged: Values = {}
    for tenant, value in values:
        key = (known_label(tenant),)
        merged[key] = combine(merged[key], value) if key in merged else value
    return merged
