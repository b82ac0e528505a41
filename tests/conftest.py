"""Session fixtures: a real Kafka broker (started or reused), unique topics per test,
and one chDB path per session with a unique database per test.

``KEEL_TEST_INFRA=testcontainers`` (needs Docker and ``pip install -e '.[docker]'``) runs
the same suite against a Kafka container and a ClickHouse server container instead.
The default, ``local``, needs no Docker: it starts the broker from the Maven jars.
"""

from __future__ import annotations

import gc
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from keel.bootstrap import ensure_local_keys
from keel.config import Settings
from keel.kafka.broker import start_broker
from keel.kafka.clients import admin_config
from keel.kafka.topics import apply_topics, declared_topics
from keel.supervision import collector


pytest_plugins = ["tests.plugins.user_data", "tests.plugins.postgres", "tests.plugins.analytics",
                  "tests.plugins.trust", "tests.plugins.spans"]

INFRA = os.environ.get("KEEL_TEST_INFRA", "local")


@pytest.fixture(scope="session")
def broker_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of the session's broker and ClickHouse."""
    if INFRA == "testcontainers":
        yield from _containers()
        return
    if INFRA != "local":
        raise pytest.UsageError(f"KEEL_TEST_INFRA must be local or testcontainers, not {INFRA!r}")
    from tests.plugins import user_data  # registered above (pytest_plugins): imported once pytest rewrote it

    start_broker(user_data.USER)  # the user's broker: a no-op when `keel up` already started it
    user_data.broker_started()
    # Everything else of the session's own: a data dir (keys, outbox, heartbeats...) and chDB.
    # Topic prefixes are per test (``settings``); the default one is never used.
    data_dir = tmp_path_factory.mktemp("data")
    settings = user_data.USER.model_copy(update={
        "data_dir": data_dir, "topic_prefix": f"test-session-{uuid.uuid4().hex[:10]}",
        "clickhouse_dsn": f"chdb://{tmp_path_factory.mktemp('chdb')}"})
    ensure_local_keys(settings)  # personal fields are sealed, as after `keel up`, with the session's keys
    yield settings


def _containers() -> Iterator[Settings]:
    """Kafka and ClickHouse in containers (opt-in; requires a Docker engine)."""
    # testcontainers comes with the optional docker extra, not installed for type checking
    from testcontainers.clickhouse import ClickHouseContainer  # type: ignore[import-not-found, unused-ignore]
    from testcontainers.kafka import KafkaContainer  # type: ignore[import-not-found, unused-ignore]

    with KafkaContainer("apache/kafka:4.1.1") as kafka, \
            ClickHouseContainer("clickhouse/clickhouse-server:25.8") as clickhouse:
        host, port = clickhouse.get_container_host_ip(), clickhouse.get_exposed_port(8123)
        yield Settings(
            kafka_bootstrap=kafka.get_bootstrap_server(),
            clickhouse_dsn=f"http://{clickhouse.username}:{clickhouse.password}@{host}:{port}",
        )


@pytest.fixture
def settings(broker_settings: Settings) -> Iterator[Settings]:
    """Settings with this test's own topics (created) and its own ClickHouse database."""
    with own_topics(broker_settings) as settings:
        yield settings


@contextmanager
def own_topics(broker_settings: Settings) -> Iterator[Settings]:
    """``broker_settings`` with topics (created, deleted after) and a ClickHouse database of their own:
    ``settings`` for one test, or for a module's tests that share one platform."""
    suffix = uuid.uuid4().hex[:10]
    settings = broker_settings.model_copy(update={
        "topic_prefix": f"test-{suffix}",
        "clickhouse_database": f"keel_{suffix}",
        "topic_partitions": 3,
    })
    admin = AdminClient(admin_config(settings))
    specs = declared_topics(settings)
    apply_topics(admin, specs)
    yield settings
    for name, future in admin.delete_topics([s.name for s in specs], operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:  # cleanup only: never fail the test that already ran
            warnings.warn(f"could not delete test topic {name}: {exc}", stacklevel=1)


@pytest.fixture
def settled_collector() -> Iterator[None]:
    """The collector as a service settles it; restored afterwards."""
    thresholds = gc.get_threshold()
    collector.settle()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
