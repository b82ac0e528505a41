"""Fixtures for the trust suites: checkpoint signing keys, master keys, key stores, chainers."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from keel.config import Settings
from keel.kafka.clients import admin_config
from keel.kafka.topics import apply_topics, declared_topics
from keel.trust.chainer import Chainer
from keel.trust.checkpoints import CheckpointSigner, TrustedKeys, generate_signing_key
from keel.trust.settings import TrustSettings


def make_trust_settings(folder: Path) -> TrustSettings:
    """A fresh signing key (k1) with its public key trusted, checkpoints every 50 records or 1 s."""
    private, public = generate_signing_key(folder / "keys", "k1")
    trusted = folder / "trusted"
    trusted.mkdir()
    (trusted / public.name).write_bytes(public.read_bytes())
    master = folder / "master.key"
    master.write_bytes(os.urandom(32))
    return TrustSettings(audit_signing_key_file=private, audit_signing_key_id="k1",
                         audit_trusted_keys_dir=trusted, audit_checkpoint_every=50,
                         audit_checkpoint_interval_s=1.0, master_key_file=master,
                         keystore_dsn=f"sqlite:///{folder / 'keys.db'}")


@pytest.fixture
def trust_settings(tmp_path: Path) -> TrustSettings:
    """This test's own signing, trust and master keys."""
    return make_trust_settings(tmp_path)


@contextmanager
def own_topics(base: Settings) -> Iterator[Settings]:
    """Settings with a fresh topic prefix (topics created, deleted afterwards), for module-scoped worlds."""
    suffix = uuid.uuid4().hex[:10]
    settings = base.model_copy(update={"topic_prefix": f"test-{suffix}", "topic_partitions": 3,
                                       "clickhouse_database": f"keel_{suffix}"})
    admin = AdminClient(admin_config(settings))
    specs = declared_topics(settings)
    apply_topics(admin, specs)
    try:
        yield settings
    finally:
        for future in admin.delete_topics([s.name for s in specs], operation_timeout=30).values():
            try:
                future.result()
            except KafkaException as exc:  # cleanup only
                warnings.warn(f"could not delete test topic: {exc}", stacklevel=1)


@pytest.fixture
def trusted_keys(trust_settings: TrustSettings) -> TrustedKeys:
    return TrustedKeys.from_settings(trust_settings)


@pytest.fixture
def chainer(settings: Settings, trust_settings: TrustSettings) -> Iterator[Chainer]:
    """An in-process chainer on this test's topics."""
    worker = Chainer(settings, CheckpointSigner.from_settings(trust_settings), instance_id="test",
                     checkpoint_every=trust_settings.audit_checkpoint_every,
                     checkpoint_interval_s=trust_settings.audit_checkpoint_interval_s)
    yield worker
    worker.close()


def trust_env(settings: Settings, trust: TrustSettings) -> dict[str, str]:
    """Environment for a ``keel`` subprocess on this test's topics and keys."""
    return {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix,
            "KEEL_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
            "KEEL_DATA_DIR": str(settings.data_dir),
            "KEEL_CLICKHOUSE_DSN": settings.analytics_dsn,
            "KEEL_CLICKHOUSE_DATABASE": settings.clickhouse_database,
            "KEEL_AUDIT_SIGNING_KEY_FILE": str(trust.audit_signing_key_file),
            "KEEL_AUDIT_SIGNING_KEY_ID": trust.audit_signing_key_id,
            "KEEL_AUDIT_TRUSTED_KEYS_DIR": str(trust.audit_trusted_keys_dir),
            "KEEL_AUDIT_CHECKPOINT_EVERY": str(trust.audit_checkpoint_every),
            "KEEL_AUDIT_CHECKPOINT_INTERVAL_S": str(trust.audit_checkpoint_interval_s),
            "KEEL_MASTER_KEY_FILE": str(trust.master_key_file),
            "KEEL_KEYSTORE_DSN": str(trust.keystore_dsn)}
