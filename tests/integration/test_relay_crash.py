"""`keel relay` killed with SIGKILL at random points loses nothing and keeps each aggregate's order."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.enqueue import to_new_command
from keel.outbox.store import OutboxStore
from tests.helpers import command, start

pytestmark = pytest.mark.integration

CODEC = EnvelopeCodec()


def relay_process(settings: Settings, dsn: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_OUTBOX_DSN": dsn,
           "KEEL_DATA_DIR": str(tmp_path), "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
           "KEEL_RELAY_BATCH_SIZE": "10", "KEEL_RELAY_LEASE_TTL_S": "1"}
    with (tmp_path / "relay.log").open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "keel.cli", "relay", "--no-track"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)


def holds_lease(store: OutboxStore, pid: int) -> bool:
    """True once the relay process ``pid`` holds the outbox's relay lease."""
    with store.db.transaction() as cursor:
        rows = cursor.query("SELECT holder FROM keel_leases WHERE name = 'relay'")
    return bool(rows) and f":{pid}:" in rows[0][0]


def test_a_relay_killed_at_random_points_loses_nothing_and_keeps_order(
        settings: Settings, tmp_path: Path) -> None:
    dsn = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    store = OutboxStore(open_database(dsn))
    store.migrate()
    commands = [command("acme", f"sub-{i % 20}", start()) for i in range(6000)]
    for offset in range(0, len(commands), 500):
        store.accept([to_new_command(c, CODEC.encode(c)) for c in commands[offset:offset + 500]])
    rng, kills_mid_stream = random.Random(7), 0
    for _ in range(4):
        before = len(store.unsent(10_000))
        process = relay_process(settings, dsn, tmp_path)
        deadline = time.monotonic() + 60
        while len(store.unsent(10_000)) == before and time.monotonic() < deadline:
            time.sleep(0.02)  # wait until this relay has made progress, then kill it mid-stream
        time.sleep(rng.uniform(0, 0.1))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills_mid_stream += 0 < len(store.unsent(10_000)) < before
    final = relay_process(settings, dsn, tmp_path)
    deadline = time.monotonic() + 90
    while (store.unsent(1) or not holds_lease(store, final.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    final.send_signal(signal.SIGTERM)
    assert final.wait(timeout=30) == 0, (tmp_path / "relay.log").read_text()[-3000:]
    assert kills_mid_stream >= 3, "the kills did not land while rows were in flight"
    assert store.unsent(1) == []
    seen: dict[str, list[uuid.UUID]] = defaultdict(list)
    for message in read_to_end(settings, topic_name(settings, Topic.COMMANDS)):
        envelope = CODEC.decode(message.value() or b"")
        if envelope.id not in seen[envelope.key]:
            seen[envelope.key].append(envelope.id)
    expected: dict[str, list[uuid.UUID]] = defaultdict(list)
    for c in commands:
        expected[c.key].append(c.id)
    assert seen == expected  # every command, first occurrences in acceptance order per aggregate
    store.db.close()
