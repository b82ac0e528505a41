"""Keel's topics, declared in code and applied idempotently through the admin API.

Every tenant-keyed topic has the same partition count, so the key ``tenant/aggregate``
lands one aggregate's commands and events on the same partition number, and the
processor that owns a commands partition owns that aggregate's events too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import StrEnum

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from confluent_kafka.cimpl import NewTopic

from keel.config import Settings
from keel.errors import InfraError
from keel.kafka.errors import KafkaWatch

_DAY_MS = 24 * 3600 * 1000
FOREVER = -1


class Topic(StrEnum):
    """The role of a topic; its name is ``<prefix>.<role>``."""

    COMMANDS = "commands"
    EVENTS = "events"
    AUDIT = "audit"
    AUDIT_INTAKE = "audit-intake"
    AUDIT_CHECKPOINTS = "audit-checkpoints"
    CONTROLS = "controls"
    DLQ = "dlq"
    EFFECTS = "effects"
    SNAPSHOTS = "snapshots"


@dataclass(frozen=True)
class TopicSpec:
    """What a topic must look like: partitions, retention, cleanup, durability."""

    name: str
    partitions: int
    replication_factor: int
    retention_ms: int
    cleanup_policy: str
    min_insync_replicas: int
    description: str
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, str]:
        return {
            "retention.ms": str(self.retention_ms),
            "cleanup.policy": self.cleanup_policy,
            "min.insync.replicas": str(self.min_insync_replicas),
            **self.extra,
        }


def topic_name(settings: Settings, topic: Topic) -> str:
    """The full name of ``topic`` under the configured prefix."""
    return f"{settings.topic_prefix}.{topic.value}"


def declared_topics(settings: Settings) -> list[TopicSpec]:
    """Every topic Keel needs, as specs."""

    def spec(topic: Topic, retention_ms: int, description: str, cleanup: str = "delete") -> TopicSpec:
        return TopicSpec(
            name=topic_name(settings, topic),
            partitions=settings.topic_partitions,
            replication_factor=settings.replication_factor,
            retention_ms=retention_ms,
            cleanup_policy=cleanup,
            min_insync_replicas=settings.min_insync_replicas,
            description=description,
        )

    return [
        spec(Topic.COMMANDS, 7 * _DAY_MS, "Commands from producers, keyed tenant/aggregate."),
        spec(Topic.EVENTS, FOREVER, "Immutable events; the source of truth, kept forever."),
        spec(Topic.AUDIT_INTAKE, 30 * _DAY_MS,
             "Every event, keyed by tenant only, so one tenant's audit chain is built in one place."),
        spec(Topic.AUDIT, FOREVER, "Hash-chained tenant audit records, kept forever."),
        spec(Topic.AUDIT_CHECKPOINTS, FOREVER, "Signed chain heads (tenant, sequence, hash)."),
        spec(Topic.DLQ, 30 * _DAY_MS, "Messages that could not be processed, with the reason."),
        spec(Topic.EFFECTS, 7 * _DAY_MS,
             "What effect workers are doing (running, waiting and why), keyed tenant/effect; outcomes are events."),
        spec(Topic.CONTROLS, FOREVER, "Current guardrail switches per tenant; the latest value per key wins.",
             cleanup="compact"),
        # Partitioned like the events (partition p checkpoints events partition p). Small segments:
        # the log cleaner never compacts the active one, and a load reads what is not compacted.
        replace(spec(Topic.SNAPSHOTS, FOREVER, "Processor checkpoints of aggregate state and decided ids, "
                     "per events partition; the latest value per key wins.", cleanup="compact"),
                extra={"segment.bytes": str(64 * 1024 * 1024)}),
    ]


def topics_admin(config: dict[str, object]) -> tuple[AdminClient, KafkaWatch]:
    """An admin client for ``apply_topics`` whose refused login or denied ACL reads as such."""
    watch = KafkaWatch(config)
    return AdminClient(watch.config(config)), watch


def apply_topics(admin: AdminClient, specs: list[TopicSpec], timeout_s: float = 30.0,
                 watch: KafkaWatch | None = None) -> dict[str, str]:
    """Create missing topics and set declared configs on existing ones; returns what was done.

    With the ``watch`` of ``topics_admin`` a refused login raises ``AuthenticationFailed`` at
    once; a denied ACL raises ``AuthorizationDenied`` either way (naming the principal when
    the watch knows it). A topic the principal may not describe is absent from its metadata,
    so it is "missing" here and its creation is what the broker denies.
    """
    watch = watch or KafkaWatch({})
    existing = watch.metadata(admin, None, timeout_s).topics
    outcome: dict[str, str] = {}
    missing = [s for s in specs if s.name not in existing]
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication_factor, config=s.config) for s in missing],
            operation_timeout=timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result()
                outcome[name] = "created"
            except KafkaException as exc:
                denied = watch.translate(exc, resource=name, operation="CREATE")
                if denied is not None:
                    raise denied from exc
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent apply won
                    raise InfraError(f"could not create topic {name}: {exc}", code="topic_create_failed") from exc
                outcome[name] = "exists"
    if missing:
        _await_metadata(admin, {s.name for s in missing}, timeout_s, watch)
    for s in specs:
        if s.name not in existing:
            continue
        partitions = len(existing[s.name].partitions)
        if partitions != s.partitions:
            raise InfraError(
                f"topic {s.name} has {partitions} partitions, the declaration says {s.partitions}; "
                "changing it would move keys between partitions",
                code="topic_partitions_mismatch",
            )
        resource = ConfigResource(ResourceType.TOPIC, s.name, incremental_configs=[
            ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
            for key, value in s.config.items()
        ])
        for future in admin.incremental_alter_configs([resource]).values():
            try:
                future.result()
            except KafkaException as exc:
                denied = watch.translate(exc, resource=s.name, operation="ALTER_CONFIGS")
                if denied is not None:
                    raise denied from exc
                raise
        outcome[s.name] = "updated"
    return outcome


def _await_metadata(admin: AdminClient, names: set[str], timeout_s: float, watch: KafkaWatch) -> None:
    """Wait until new topics show in metadata, so the next client finds them at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        topics = watch.metadata(admin, None, timeout_s).topics
        if all(name in topics and topics[name].error is None and topics[name].partitions for name in names):
            return
        if time.monotonic() > deadline:
            raise InfraError(f"topics {sorted(names)} did not appear in metadata within {timeout_s:.0f}s",
                             code="topic_create_failed")
        time.sleep(0.1)
