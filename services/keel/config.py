"""The one typed settings object, read from ``KEEL_*`` environment variables.

Nothing here connects to anything: adapters are built from these values in
``keel.bootstrap``. ``keel config`` prints the effective settings. The one file read is the
layout of a local cluster (``LOCAL_CLUSTER_FILE``), whose addresses and replication become
the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, computed_field, model_validator
from pydantic import ValidationError as PydanticError
from pydantic_settings import BaseSettings, SettingsConfigDict

from keel.errors import InfraError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER_FILE = Path("kafka") / "cluster.json"
"""Under the data dir: the layout of the cluster ``keel up --brokers N`` started there (absent for
the single broker). Settings read its bootstrap addresses and replication from it."""


class RecordedNode(BaseModel):
    """One node in ``cluster.json``."""

    model_config = ConfigDict(frozen=True, strict=True)

    node_id: int = Field(ge=1)
    port: int = Field(ge=1, le=65535)
    controller_port: int = Field(ge=1, le=65535)


class RecordedCluster(BaseModel):
    """``cluster.json`` as ``keel.kafka.cluster`` writes it: the nodes, and the client settings they imply."""

    model_config = ConfigDict(frozen=True, strict=True)

    host: str = Field(min_length=1)
    cluster_id: str = Field(min_length=1)
    nodes: tuple[RecordedNode, ...] = Field(min_length=1)
    kafka_bootstrap: str = Field(min_length=1)
    replication_factor: int = Field(ge=1)
    min_insync_replicas: int = Field(ge=1)


def recorded_cluster_file(data_dir: Path) -> RecordedCluster | None:
    """The local cluster recorded under ``data_dir``, or ``None`` when there is none (the single broker).

    Why a broken file is an error, not "no cluster": ignoring it would point every client and
    ``keel up`` / ``status`` / ``down`` at the single broker while the cluster's nodes run on.
    """
    path = data_dir / LOCAL_CLUSTER_FILE
    try:
        return RecordedCluster.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = f"cannot be read ({exc.strerror})"
    except PydanticError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        why = f"is not the layout of a local cluster ({where + ': ' if where else ''}{first['msg']})"
    raise InfraError(
        f"{path} {why}. It records the cluster `keel up --brokers N` started in {data_dir}: restore it, or stop "
        f"the cluster's nodes (their PIDs are in {data_dir / 'kafka'}/node-*/broker.pid) and remove it (then "
        "`keel down --wipe` deletes the nodes' data and `keel up --brokers N` starts a new cluster)",
        code="cluster_layout_broken")


class Settings(BaseSettings):
    """Effective configuration of one Keel process."""

    model_config = SettingsConfigDict(env_prefix="KEEL_", frozen=True)

    data_dir: Path = Field(
        default=PROJECT_ROOT / ".keel",
        description="Where the local broker, chDB and state files live.",
    )
    kafka_host: str = Field(default="127.0.0.1", description="Interface the local broker binds.")
    kafka_port: int = Field(default=19092, description="Client port of the local broker.")
    kafka_controller_port: int = Field(default=19093, description="KRaft controller port.")
    kafka_bootstrap: str | None = Field(
        default=None, description="Bootstrap servers; defaults to the local broker (every node of a local "
        "cluster that `keel up --brokers N` started in the data dir)."
    )
    kafka_home: Path = Field(
        default=PROJECT_ROOT / "infra" / "kafka",
        description="Folder holding pom.xml, server.properties and the fetched libs/.",
    )
    kafka_start_timeout_s: float = Field(default=60.0, description="Bound on waiting for the broker.")
    topic_prefix: str = Field(default="keel", description="Prefix of every Keel topic.")
    topic_partitions: int = Field(default=6, ge=1, description="Partitions per tenant-keyed topic.")
    replication_factor: int = Field(
        default=1, ge=1, description="Replication factor of Keel topics; defaults to min(3, N) under a local "
        "cluster of N brokers (`keel up --brokers N`). Set it (with the next) for any other cluster.")
    min_insync_replicas: int = Field(
        default=1, ge=1, description="min.insync.replicas of Keel topics; defaults to the replication factor "
        "minus one (at least 1) under a local cluster.")
    kafka_sasl_username: str | None = Field(default=None, description="SASL/SCRAM user (secure brokers).")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="SASL/SCRAM password.")
    kafka_sasl_mechanism: str = Field(default="SCRAM-SHA-512", description="SASL mechanism.")
    clickhouse_dsn: str | None = Field(
        default=None,
        description="chdb:///path (embedded, the default under data_dir) or http://host:8123.",
    )
    clickhouse_database: str = Field(default="keel", description="Database holding projections.")
    projector_linger_s: float = Field(
        default=0.5, gt=0, le=60,
        description="Longest a projected record waits for others to share its insert (a full batch goes at "
        "once). Each insert costs the engine a fixed share beside its rows: at 2,500-3,000 events/s a 0.1 s "
        "linger cost the projector about 30 % more CPU per event than 0.5 s. Lower it for fresher queries.",
    )
    processor_batch_size: int = Field(default=5000, ge=1, description="Commands per transaction.")
    processor_linger_s: float = Field(
        default=0.1, ge=0, le=5,
        description="Above 2,000 commands a second per worker, how long after a batch was taken the next one "
        "gathers before its transaction: a transaction costs the broker and the worker milliseconds of CPU "
        "whatever it holds. Lighter load never waits. 0: a batch is whatever arrived during the last commit.",
    )
    processor_instance: str = Field(
        default="0", description="Worker instance id; part of the transactional.id."
    )
    processor_static_membership: bool = Field(
        default=False,
        description="Join the group as a static member named by the instance id: a restarted worker "
        "gets its partitions back at once, without a rebalance. For fixed worker sets (one id each); "
        "a static member that stops for good holds its partitions until the session times out.",
    )
    processor_session_timeout_ms: int = Field(
        default=10_000, ge=6_000, description="How long the group waits for a silent worker."
    )
    kafka_transaction_timeout_ms: int = Field(
        default=60_000, ge=1_000,
        description="transaction.timeout.ms of the processor's and chainer's producers: how long the broker "
        "keeps a transaction open before it aborts it. A broker outage longer than this fences the producer, "
        "and the worker starts again under a new one.",
    )
    watchdog_stall_s: float = Field(
        default=60.0, gt=0,
        description="How long a transactional worker (processor, chainer) may stay in one step of a batch, "
        "or see records waiting and consume none, before it counts as stalled: it logs why, and the process "
        "ends so that its supervisor starts a fresh one.",
    )
    processor_dedupe_window_s: float = Field(
        default=30 * 24 * 3600, ge=0,
        description="How long a worker remembers a decided command id (about 25 bytes each), so a re-sent "
        "command is acknowledged as a duplicate; keep it longer than KEEL_OUTBOX_RETENTION_S. Commands "
        "created before the window are dead-lettered. 0 remembers every id (memory grows for ever).",
    )
    processor_snapshot_events: int = Field(
        default=50_000, ge=0,
        description="Events of a partition after which a worker checkpoints its state (the aggregates changed "
        "and the ids decided since the previous checkpoint) to the snapshots topic, in a batch's transaction: "
        "a start-up loads the checkpoint and folds at most about this many events. 0 writes no snapshots "
        "(every start-up folds whole partitions).",
    )
    processor_snapshot_interval_s: float = Field(
        default=300.0, gt=0,
        description="Longest time between two checkpoints of a partition that changed, however few its events.",
    )

    effects_instance: str = Field(default="0", description="Effect worker instance id (its heartbeat's name).")
    effects_static_membership: bool = Field(
        default=False,
        description="Join the effect worker group as a static member named by the instance id: a restarted "
        "worker gets its partitions back at once, without a rebalance (as processor_static_membership).")
    effects_max_in_flight: int = Field(
        default=512, ge=1,
        description="Effect attempts one worker runs at once, over every tenant and provider: at 50 ms a "
        "provider call, 512 carry some 10,000 effects a second.")
    effects_max_per_tenant: int = Field(
        default=128, ge=1, description="Effect attempts of one tenant one worker runs at once.")
    effects_max_per_provider: int = Field(
        default=256, ge=1, description="Effect attempts of one tenant against one provider one worker runs at once.")
    effects_max_buffered: int = Field(
        default=10_000, ge=1,
        description="Effects a worker holds read but unsettled before it stops reading (it reads on at half).")
    effects_threads: int = Field(
        default=128, ge=1,
        description="Threads that run synchronous effect handlers; an attempt past its timeout keeps its "
        "thread until the handler returns.")
    effects_breaker_failures: int = Field(
        default=5, ge=1,
        description="Consecutive retryable failures of one tenant's provider that open its breaker.")
    effects_breaker_cooldown_s: float = Field(
        default=2.0, gt=0, description="How long an open provider breaker waits before its first probe.")
    effects_breaker_max_cooldown_s: float = Field(
        default=30.0, gt=0, description="The longest wait between probes (it doubles after each failed one).")
    effects_stop_grace_s: float = Field(
        default=10.0, ge=0,
        description="How long a stopping effect worker waits for running attempts and their outcomes.")

    metrics_enabled: bool = Field(
        default=True,
        description="Serve Prometheus metrics at /metrics from every long-running service (keel.observability).")
    metrics_host: str = Field(
        default="127.0.0.1", description="Interface each service's metrics server binds (0.0.0.0 in a container).")
    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port of a service's metrics server; 0 picks a free one and publishes it for Prometheus's "
        "file_sd under <data dir>/run/metrics/ (one fixed port suits one service per container).")
    metrics_tenants: str = Field(
        default="",
        description="Comma-separated tenants that get their own `tenant` label; all others are `other`. Empty: "
        "the busiest KEEL_METRICS_TOP_TENANTS tenants of each process get one.")
    metrics_top_tenants: int = Field(
        default=20, ge=0, description="How many of the busiest tenants get their own `tenant` label (no allow-list).")
    metrics_lag_interval_ms: int = Field(
        default=5000, ge=0,
        description="How often librdkafka reports consumer lag to the metrics (statistics.interval.ms); 0: never.")

    @model_validator(mode="before")
    @classmethod
    def _follow_local_cluster(cls, data: Any) -> Any:
        """Default the bootstrap and replication to those of the local cluster in the data dir, if one is
        recorded there, so every process of a `keel up --brokers N` installation uses all its nodes and
        replicates as it can without extra variables; values set explicitly still win."""
        if not isinstance(data, dict):
            return data
        cluster = recorded_cluster_file(Path(data.get("data_dir") or cls.model_fields["data_dir"].default))
        if cluster is None:
            return data
        return {**cluster.model_dump(include={"kafka_bootstrap", "replication_factor", "min_insync_replicas"}),
                **data}

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bootstrap_servers(self) -> str:
        """The bootstrap servers clients use."""
        return self.kafka_bootstrap or f"{self.kafka_host}:{self.kafka_port}"

    def kafka_auth(self) -> dict[str, str]:
        """librdkafka settings that authenticate as the configured principal (none if unset)."""
        if self.kafka_sasl_username is None:
            return {}
        password = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else ""
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": self.kafka_sasl_mechanism,
                "sasl.username": self.kafka_sasl_username, "sasl.password": password}

    @computed_field  # type: ignore[prop-decorator]
    @property
    def analytics_dsn(self) -> str:
        """The ClickHouse DSN: embedded chDB under ``data_dir`` unless a DSN is given."""
        return self.clickhouse_dsn or f"chdb://{(self.data_dir / 'chdb').resolve()}"
