"""pytest fixtures for a domain's integration tests: its own topics on a running broker, and a ``Pipeline``.

Enable with ``pytest_plugins = ["keel.testing.pytest_plugin"]`` in the root ``conftest.py``.
The broker is the one ``KEEL_*`` names (``keel up`` starts the local one); each test gets
topics under a prefix of its own, deleted afterwards, and a data dir of its own with local
keys, so personal fields are sealed as in production and nothing touches a user's data.
A project with its own broker fixtures overrides ``keel_settings``. ``keel_provider`` is a
provider simulator (``keel.testing.provider``) to test effect handlers against.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from keel.bootstrap import ensure_local_keys
from keel.config import Settings
from keel.kafka.clients import admin_config
from keel.kafka.topics import apply_topics, declared_topics
from keel.testing.pipeline import Pipeline, processing
from keel.testing.provider import ProviderSimulator


@pytest.fixture
def keel_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings of the environment's broker with this test's own topics (created) and data dir."""
    settings = Settings().model_copy(update={"topic_prefix": f"test-{uuid.uuid4().hex[:10]}",
                                             "data_dir": tmp_path / "keel"})
    ensure_local_keys(settings)
    admin = AdminClient(admin_config(settings))
    specs = declared_topics(settings)
    try:
        apply_topics(admin, specs)
    except KafkaException as exc:
        pytest.fail(f"no Kafka broker answers at {settings.bootstrap_servers} ({exc}); start one with "
                    "`keel up` or name one with KEEL_KAFKA_BOOTSTRAP", pytrace=False)
    yield settings
    for name, future in admin.delete_topics([s.name for s in specs], operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:  # cleanup only: never fail the test that already ran
            warnings.warn(f"could not delete test topic {name}: {exc}", stacklevel=1)


@pytest.fixture
def keel_pipeline(keel_settings: Settings) -> Iterator[Pipeline]:
    """A processor worker on ``keel_settings``' topics; ``run(*commands)`` returns what each one yielded."""
    with processing(keel_settings) as pipeline:
        yield pipeline


@pytest.fixture(scope="session")
def keel_provider_process() -> Iterator[ProviderSimulator]:
    """One provider simulator process for the session (``keel_provider`` resets it per test)."""
    with ProviderSimulator() as simulator:
        yield simulator


@pytest.fixture
def keel_provider(keel_provider_process: ProviderSimulator) -> ProviderSimulator:
    """The provider simulator with no faults and nothing performed: point your effects' URLs at ``.url``."""
    keel_provider_process.reset()
    return keel_provider_process
