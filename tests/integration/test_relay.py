"""The outbox relay against a real broker: order, no skipped late commits, several relays."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.gateway.settings import IngressSettings
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.enqueue import enqueue, to_new_command
from keel.outbox.models import CommandStatus
from keel.outbox.store import OutboxStore
from keel.relay.relay import Relay
from tests.helpers import command, start

pytestmark = pytest.mark.integration

CODEC = EnvelopeCodec()
FAST = IngressSettings(relay_lease_ttl_s=2.0, relay_poll_interval_s=0.01, relay_batch_size=50)


def published(settings: Settings) -> list[tuple[str, uuid.UUID]]:
    """(key, command id) of every record on the commands topic, in per-partition log order."""
    return [((m.key() or b"").decode(), CODEC.decode(m.value() or b"").id)
            for m in read_to_end(settings, topic_name(settings, Topic.COMMANDS))]


def first_seen_order(records: list[tuple[str, uuid.UUID]]) -> dict[str, list[uuid.UUID]]:
    """Per key, command ids in the order the processor would first see them (duplicates dropped)."""
    order: dict[str, list[uuid.UUID]] = defaultdict(list)
    for key, command_id in records:
        if command_id not in order[key]:
            order[key].append(command_id)
    return order


def drain(relay: Relay, store: OutboxStore, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while store.unsent(1):
        assert time.monotonic() < deadline, "the relay did not drain the outbox"
        relay.run_once()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[OutboxStore]:
    store = OutboxStore(open_database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}"))
    store.migrate()
    yield store
    store.db.close()


@pytest.fixture
def pg_store(postgres_dsn: str) -> Iterator[OutboxStore]:
    store = OutboxStore(open_database(postgres_dsn))
    store.migrate()
    yield store
    store.db.close()


def accept(store: OutboxStore, tenant: str, aggregate: str) -> uuid.UUID:
    cmd = command(tenant, aggregate, start())
    store.accept([to_new_command(cmd, CODEC.encode(cmd))])
    return cmd.id


def test_rows_are_published_once_in_order_and_marked_after_delivery(
        settings: Settings, sqlite_store: OutboxStore) -> None:
    ids = [accept(sqlite_store, tenant, f"sub-{i % 4}") for i in range(60) for tenant in ("acme", "globex")]
    relay = Relay(sqlite_store, settings, FAST)
    drain(relay, sqlite_store)
    relay.close()
    records = published(settings)
    assert sorted(i for _, i in records) == sorted(ids)  # all of them, none twice
    for key, order in first_seen_order(records).items():
        assert order == [i for i in ids if i in set(order)], f"{key} out of order"
    record = sqlite_store.get("acme", ids[0])
    assert record is not None and record.status is CommandStatus.PUBLISHED


def test_the_lease_holder_prunes_published_rows_past_the_retention(
        settings: Settings, sqlite_store: OutboxStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keel.relay.relay.PRUNE_EVERY_S", 0.0)  # every round, not once a minute
    ids = [accept(sqlite_store, "acme", f"sub-{i}") for i in range(3)]
    relay = Relay(sqlite_store, settings, FAST.model_copy(update={"outbox_retention_s": 0.5}))
    drain(relay, sqlite_store)  # one round: published, and too young to go
    assert relay.stats.pruned == 0 and all(sqlite_store.get("acme", i) is not None for i in ids)
    time.sleep(0.6)
    relay.run_once()
    relay.close()
    assert relay.stats.pruned == 3 and all(sqlite_store.get("acme", i) is None for i in ids)


def test_a_row_that_commits_after_later_rows_is_not_skipped_on_postgres(
        settings: Settings, pg_store: OutboxStore, postgres_dsn: str) -> None:
    relay = Relay(pg_store, settings, FAST)
    slow = command("acme", "slow", start())
    with psycopg.connect(postgres_dsn) as long_tx:
        enqueue(long_tx, slow)  # takes the lowest seq and holds its transaction open
        fast_ids = [accept(pg_store, "acme", f"fast-{i}") for i in range(5)]
        drain(relay, pg_store)  # publishes the later, committed rows; the open one is invisible
        assert {i for _, i in published(settings)} == set(fast_ids)
        long_tx.commit()
    drain(relay, pg_store)
    relay.close()
    assert {i for _, i in published(settings)} == {*fast_ids, slow.id}


def test_concurrent_long_and_short_transactions_lose_nothing_and_keep_order_on_postgres(
        settings: Settings, pg_store: OutboxStore, postgres_dsn: str) -> None:
    stop = threading.Event()
    relay = Relay(pg_store, settings, FAST)
    relay_thread = threading.Thread(target=relay.run, args=(stop,))
    relay_thread.start()
    written: dict[str, list[uuid.UUID]] = {}

    def producer(worker: int) -> None:
        rng = random.Random(worker)
        aggregate, ids = f"agg-{worker}", []
        with psycopg.connect(postgres_dsn) as connection:
            for _ in range(25):
                cmd = command("acme", aggregate, start())
                enqueue(connection, cmd)
                time.sleep(rng.choice([0, 0, 0.001, 0.02, 0.08]))  # some transactions stay open long
                connection.commit()
                ids.append(cmd.id)
        written[f"acme/{aggregate}"] = ids

    workers = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    deadline = time.monotonic() + 60
    while pg_store.unsent(1) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    relay_thread.join()
    records = published(settings)
    assert sorted(i for _, i in records) == sorted(i for ids in written.values() for i in ids)
    assert first_seen_order(records) == written


def test_only_the_lease_holder_publishes_and_a_standby_takes_over(
        settings: Settings, sqlite_store: OutboxStore) -> None:
    first, second = Relay(sqlite_store, settings, FAST), Relay(sqlite_store, settings, FAST)
    a = accept(sqlite_store, "acme", "sub-1")
    assert first.run_once() == 1
    b = accept(sqlite_store, "acme", "sub-1")
    assert second.run_once() == 0 and second.stats.standby_rounds == 1
    sqlite_store.release_lease("relay", first.holder)
    assert second.run_once() == 1
    first.close()
    second.close()
    assert [i for _, i in published(settings)] == [a, b]


def lease_expiry(store: OutboxStore) -> float:
    with store.db.transaction() as cursor:
        return float(cursor.query("SELECT expires_at FROM keel_leases WHERE name = 'relay'")[0][0])


def test_the_holder_renews_its_lease_once_a_third_of_it_has_passed_not_every_round(
        settings: Settings, sqlite_store: OutboxStore) -> None:
    ttl = 3.0  # a third of it (1 s) holds three rounds even on a slow, shared machine
    relay = Relay(sqlite_store, settings, IngressSettings(relay_lease_ttl_s=ttl, relay_batch_size=50))
    accept(sqlite_store, "acme", "sub-1")
    assert relay.run_once() == 1
    taken_at, taken = time.monotonic(), lease_expiry(sqlite_store)
    for i in range(3):  # rounds within the first third: no write to the lease
        accept(sqlite_store, "acme", f"sub-{i}")
        assert relay.run_once() == 1
    assert time.monotonic() - taken_at < ttl / 3, "the rounds outlasted a third of the TTL"
    assert lease_expiry(sqlite_store) == taken
    time.sleep(ttl / 3 - (time.monotonic() - taken_at) + 0.05)  # past a third: the next round renews it
    accept(sqlite_store, "acme", "sub-9")
    assert relay.run_once() == 1
    assert lease_expiry(sqlite_store) > taken
    relay.close()


def test_two_relays_at_once_publish_everything_in_order_deduplicable_by_id(
        settings: Settings, pg_store: OutboxStore) -> None:
    ingress = IngressSettings(relay_lease_ttl_s=0.2, relay_poll_interval_s=0.01, relay_batch_size=7)
    stop = threading.Event()
    relays = [Relay(pg_store, settings, ingress) for _ in range(2)]
    threads = [threading.Thread(target=r.run, args=(stop,)) for r in relays]
    for thread in threads:
        thread.start()
    ids = []
    for i in range(120):
        ids.append(accept(pg_store, "acme", f"sub-{i % 5}"))
        if i % 40 == 0:  # hand the lease over mid-stream
            pg_store.release_lease("relay", relays[0].holder)
    deadline = time.monotonic() + 60
    while pg_store.unsent(1) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    records = published(settings)
    assert {i for _, i in records} == set(ids)
    for key, order in first_seen_order(records).items():
        assert order == [i for i in ids if i in set(order)], f"{key} out of order"
