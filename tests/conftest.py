"""Session fixtures: a real Kafka broker (started or reused), unique topics per test,
and one chDB path per session with a unique database per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from keel.config import Settings
from keel.kafka.broker import start_broker
from keel.kafka.clients import admin_config
from keel.kafka.topics import apply_topics, declared_topics


@pytest.fixture(scope="session")
def broker_settings() -> Settings:
    """Settings of the session's broker: started here unless one already serves."""
    settings = Settings()
    start_broker(settings)
    return settings


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded ClickHouse data path per session (only one process may own it)."""
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def settings(broker_settings: Settings, chdb_path: Path) -> Iterator[Settings]:
    """Settings with this test's own topics (created) and its own ClickHouse database."""
    suffix = uuid.uuid4().hex[:10]
    settings = broker_settings.model_copy(update={
        "topic_prefix": f"test-{suffix}",
        "clickhouse_dsn": f"chdb://{chdb_path}",
        "clickhouse_database": f"keel_{suffix}",
        "topic_partitions": 3,
    })
    admin = AdminClient(admin_config(settings))
    specs = declared_topics(settings)
    apply_topics(admin, specs)
    yield settings
    for future in admin.delete_topics([s.name for s in specs], operation_timeout=30).values():
        future.result()
