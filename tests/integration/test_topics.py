"""Topics declared in code are applied idempotently with their declared configuration."""

from __future__ import annotations

import time

import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported without __all__
    AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType)

from keel.config import Settings
from keel.errors import InfraError
from keel.kafka.clients import admin_config
from keel.kafka.topics import FOREVER, Topic, apply_topics, declared_topics, topic_name

pytestmark = pytest.mark.integration


def _config(admin: AdminClient, topic: str) -> dict[str, str]:
    [future] = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
    return {key: entry.value for key, entry in future.result().items()}


def test_every_declared_topic_exists_with_its_partitions_and_config(settings: Settings) -> None:
    admin = AdminClient(admin_config(settings))
    metadata = admin.list_topics(timeout=10).topics
    for spec in declared_topics(settings):
        assert len(metadata[spec.name].partitions) == spec.partitions
        config = _config(admin, spec.name)
        assert config["retention.ms"] == str(spec.retention_ms)
        assert config["cleanup.policy"] == spec.cleanup_policy
        assert config["min.insync.replicas"] == str(spec.min_insync_replicas)
    assert _config(admin, topic_name(settings, Topic.EVENTS))["retention.ms"] == str(FOREVER)


def test_applying_twice_changes_nothing_and_restores_drifted_config(settings: Settings) -> None:
    admin = AdminClient(admin_config(settings))
    events = topic_name(settings, Topic.EVENTS)
    drift = ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)
    [future] = admin.incremental_alter_configs(
        [ConfigResource(ResourceType.TOPIC, events, incremental_configs=[drift])]).values()
    future.result()
    deadline = time.monotonic() + 10  # let the drift land before repairing it
    while _config(admin, events)["retention.ms"] != "1000" and time.monotonic() < deadline:
        time.sleep(0.2)

    outcome = apply_topics(admin, declared_topics(settings))

    assert set(outcome.values()) == {"updated"}
    # KRaft brokers apply a committed config change asynchronously: read until it converges.
    deadline = time.monotonic() + 10
    while _config(admin, events)["retention.ms"] != str(FOREVER) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _config(admin, events)["retention.ms"] == str(FOREVER)


def test_a_partition_count_that_differs_from_the_declaration_is_refused(settings: Settings) -> None:
    admin = AdminClient(admin_config(settings))
    wider = settings.model_copy(update={"topic_partitions": settings.topic_partitions + 1})
    with pytest.raises(InfraError) as caught:
        apply_topics(admin, declared_topics(wider))
    assert caught.value.code == "topic_partitions_mismatch"
