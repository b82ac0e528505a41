"""A Kafka outage: the outbox keeps accepting, the relay waits, and then delivers everything in order."""

from __future__ import annotations

import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.gateway.settings import IngressSettings
from keel.kafka.broker import start_broker, stop_broker
from keel.kafka.clients import admin_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.outbox.db import open_database
from keel.outbox.enqueue import to_new_command
from keel.outbox.store import OutboxStore
from keel.relay.relay import Relay
from tests.helpers import command, start

pytestmark = pytest.mark.integration

CODEC = EnvelopeCodec()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def private(broker_settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A private broker we may stop and start, with the declared topics."""
    settings = broker_settings.model_copy(update={
        "data_dir": tmp_path, "kafka_port": _free_port(), "kafka_controller_port": _free_port(),
        "kafka_bootstrap": None, "topic_partitions": 2})
    start_broker(settings)
    apply_topics(AdminClient(admin_config(settings)), declared_topics(settings))
    yield settings
    stop_broker(settings)


def accept(store: OutboxStore, n: int) -> list[Envelope]:
    commands = [command("acme", f"sub-{i % 3}", start()) for i in range(n)]
    store.accept([to_new_command(c, CODEC.encode(c)) for c in commands])
    return commands


def test_commands_accepted_during_a_kafka_outage_are_delivered_after_it(private: Settings, tmp_path: Path) -> None:
    store = OutboxStore(open_database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}"))
    store.migrate()
    relay = Relay(store, private, IngressSettings(relay_delivery_timeout_s=3, relay_lease_ttl_s=30))
    accepted = accept(store, 10)
    assert relay.run_once() == 10
    stop_broker(private)
    accepted += accept(store, 10)  # the outbox acknowledges with Kafka down
    assert relay.run_once() == 0  # every delivery failed: nothing is marked
    assert len(store.unsent(100)) == 10
    start_broker(private)
    deadline = time.monotonic() + 60
    while store.unsent(1) and time.monotonic() < deadline:
        relay.run_once()
    relay.close()
    seen: dict[str, list[uuid.UUID]] = defaultdict(list)
    for message in read_to_end(private, topic_name(private, Topic.COMMANDS)):
        envelope = CODEC.decode(message.value() or b"")
        if envelope.id not in seen[envelope.key]:
            seen[envelope.key].append(envelope.id)
    expected: dict[str, list[uuid.UUID]] = defaultdict(list)
    for c in accepted:
        expected[c.key].append(c.id)
    assert seen == expected  # all of them, each aggregate in acceptance order
    store.db.close()
