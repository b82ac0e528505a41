"""The status tracker follows the processor's events and dead letters into the outbox."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.gateway.settings import IngressSettings
from keel.outbox.db import open_database
from keel.outbox.enqueue import to_new_command
from keel.outbox.models import CommandStatus
from keel.outbox.store import OutboxStore
from keel.processor.worker import CommandProcessor, new_instance_id
from keel.relay.relay import Relay
from keel.relay.tracker import StatusTracker
from tests.helpers import command, refund, start

pytestmark = pytest.mark.integration

CODEC = EnvelopeCodec()
INGRESS = IngressSettings(relay_poll_interval_s=0.01)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OutboxStore]:
    store = OutboxStore(open_database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}"))
    store.migrate()
    yield store
    store.db.close()


def test_statuses_follow_execution_rejection_and_dead_letters(settings: Settings, store: OutboxStore) -> None:
    started, too_much = command("acme", "sub-1", start(price=1000)), command("acme", "sub-1", refund(5000))
    misrouted = command("acme", "sub-2", start())
    rows = [to_new_command(c, CODEC.encode(c)) for c in (started, too_much)]
    wrong_key = to_new_command(misrouted, CODEC.encode(misrouted)).model_copy(update={"key": "acme/elsewhere"})
    store.accept([*rows, wrong_key])
    relay = Relay(store, settings, INGRESS)
    assert relay.run_once() == 3
    relay.close()
    processor = CommandProcessor(settings, instance_id=new_instance_id())
    try:
        processor.run_until_caught_up(timeout_s=120)
    finally:
        processor.close()
    tracker = StatusTracker(store, settings)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tracker.run_once(timeout_s=0.5)
            records = [store.get("acme", c.id) for c in (started, too_much, misrouted)]
            if all(r is not None and r.status in {CommandStatus.EXECUTED, CommandStatus.REJECTED,
                                                   CommandStatus.DEAD_LETTERED} for r in records):
                break
    finally:
        tracker.close()
    executed, rejected, dead = records
    assert executed is not None and executed.status is CommandStatus.EXECUTED
    assert [e.type for e in executed.events] == ["SubscriptionStarted"]
    assert executed.events[0].payload["monthly_price_cents"] == 1000
    assert rejected is not None and rejected.status is CommandStatus.REJECTED
    assert rejected.reason_code and rejected.reason and rejected.events[0].type == "CommandRejected"
    assert dead is not None and dead.status is CommandStatus.DEAD_LETTERED and dead.reason_code == "key_mismatch"
    assert store.get("acme", uuid.uuid4()) is None
