"""The outbox store's contract, run against every adapter: SQLite and a real PostgreSQL."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.effects.progress import EffectState
from keel.effects.status import EffectChange, Stage
from keel.errors import KeelError
from keel.outbox.db import SQLiteDatabase, open_database
from keel.outbox.enqueue import enqueue
from keel.outbox.models import CommandStatus, NewCommand, Outcome, RecordedEvent, TrackedEvent
from keel.outbox.store import OutboxStore
from keel.relay.status import iso_text
from support_desk.messages import SubscriptionStarted
from tests.helpers import AGENT, command, start

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgres"])
def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
def store(dsn: str) -> Iterator[OutboxStore]:
    store = OutboxStore(open_database(dsn))
    store.migrate()
    yield store
    store.db.close()


def new(tenant: str = "acme", aggregate: str = "sub-1", body: str = "h1",
        command_id: uuid.UUID | None = None) -> NewCommand:
    return NewCommand(command_id=command_id or uuid.uuid4(), tenant_id=tenant, key=f"{tenant}/{aggregate}",
                      command_type="StartSubscription", actor="agent:bot", request_hash=body,
                      value=b"\xc3\x01" + body.encode())


def test_migrate_is_idempotent(store: OutboxStore) -> None:
    store.migrate()
    store.migrate()


def test_an_accepted_command_is_readable_by_its_tenant_only(store: OutboxStore) -> None:
    row = new()
    [result] = store.accept([row])
    assert result.status is CommandStatus.ACCEPTED and not result.replayed and not result.conflict
    record = store.get("acme", row.command_id)
    assert record is not None and record.status is CommandStatus.ACCEPTED and record.key == "acme/sub-1"
    assert store.get("globex", row.command_id) is None


def test_the_same_id_and_body_answers_with_the_original_result(store: OutboxStore) -> None:
    row = new()
    store.accept([row])
    store.mark_published([row.command_id])
    [again] = store.accept([row])
    assert again.replayed and not again.conflict and again.status is CommandStatus.PUBLISHED
    assert len(store.unsent(100)) == 0


def test_the_same_id_with_another_body_or_tenant_is_a_conflict(store: OutboxStore) -> None:
    row = new()
    store.accept([row])
    [other_body] = store.accept([new(body="h2", command_id=row.command_id)])
    [other_tenant] = store.accept([new(tenant="globex", command_id=row.command_id)])
    assert other_body.conflict and other_tenant.conflict
    assert [r.command_id for r in store.unsent(10)] == [row.command_id]


def test_a_repeated_id_inside_one_batch_is_written_once(store: OutboxStore) -> None:
    row = new()
    first, second = store.accept([row, row])
    assert not first.replayed and second.replayed
    assert len(store.unsent(10)) == 1


def test_unsent_rows_come_in_acceptance_order_until_published(store: OutboxStore) -> None:
    rows = [new(aggregate=f"sub-{i % 3}") for i in range(7)]
    store.accept(rows[:4])
    store.accept(rows[4:])
    pending = store.unsent(100)
    assert [p.command_id for p in pending] == [r.command_id for r in rows]
    assert [p.seq for p in pending] == sorted(p.seq for p in pending)
    assert pending[0].value == rows[0].value and pending[0].key == rows[0].key
    assert store.mark_published([rows[0].command_id, rows[2].command_id]) == 2
    assert store.mark_published([rows[0].command_id]) == 0
    assert [p.command_id for p in store.unsent(3)] == [rows[1].command_id, rows[3].command_id,
                                                       rows[4].command_id]


def test_statuses_only_move_forward_and_events_are_kept_once(store: OutboxStore) -> None:
    row = new()
    store.accept([row])
    event = TrackedEvent(event_id=uuid.uuid4(), type="SubscriptionStarted",
                         occurred_at="2026-01-01T00:00:00+00:00", payload={"plan": "pro"})
    executed = Outcome(command_id=row.command_id, status=CommandStatus.EXECUTED, event=event)
    assert store.apply_outcomes([executed, executed]) == 1
    store.mark_published([row.command_id])  # a late delivery report hides no outcome
    assert store.apply_outcomes([Outcome(command_id=row.command_id, status=CommandStatus.PENDING_APPROVAL)]) == 0
    record = store.get("acme", row.command_id)
    assert record is not None and record.status is CommandStatus.EXECUTED
    assert [e.event_id for e in record.events] == [event.event_id]
    assert record.events[0].payload == {"plan": "pro"}


def recorded_event(causation: uuid.UUID) -> tuple[RecordedEvent, Envelope]:
    """A real event, kept as the tracker keeps it: its Avro record."""
    event = Envelope(id=uuid.uuid4(), tenant_id="acme", actor=AGENT, type="SubscriptionStarted", aggregate_id="sub-1",
                     causation_id=causation, correlation_id=uuid.uuid4(), occurred_at=datetime.now(UTC),
                     payload=SubscriptionStarted(customer_id="c-1", plan="pro", monthly_price_cents=1200,
                                                 currency="EUR"))
    return RecordedEvent(event_id=event.id, type=event.type, occurred_at=iso_text(event.occurred_at),
                         record=EnvelopeCodec().encode(event)), event


def test_a_kept_record_reads_as_its_payload_when_the_command_is_read(store: OutboxStore) -> None:
    row = new()
    store.accept([row])
    kept, event = recorded_event(row.command_id)
    assert store.apply_outcomes([Outcome(command_id=row.command_id, status=CommandStatus.EXECUTED, event=kept)]) == 1
    record = store.get("acme", row.command_id)
    assert record is not None and record.status is CommandStatus.EXECUTED
    assert [(e.event_id, e.type, e.occurred_at) for e in record.events] == [(kept.event_id, kept.type,
                                                                            kept.occurred_at)]
    assert record.events[0].payload == event.payload.model_dump(mode="json") == {
        "customer_id": "c-1", "plan": "pro", "monthly_price_cents": 1200, "currency": "EUR"}


OLD_EVENTS_TABLE = """CREATE TABLE keel_command_events (event_id TEXT PRIMARY KEY, command_id TEXT NOT NULL,
    event_type TEXT NOT NULL, occurred_at TEXT NOT NULL, payload TEXT NOT NULL)"""


def test_an_events_table_from_before_records_keeps_its_rows_and_takes_records(dsn: str) -> None:
    """An outbox whose trail was kept as JSON only (before 2026-12-07) is brought up to date by ``migrate``:
    its rows read as before, records are kept beside them, and the index by command is there."""
    db = open_database(dsn)
    old, young = new(), new()
    try:
        with db.transaction() as cursor:
            cursor.execute(OLD_EVENTS_TABLE)
            cursor.execute("CREATE INDEX keel_command_events_command ON keel_command_events (command_id)")
            cursor.execute("INSERT INTO keel_command_events (event_id, command_id, event_type, occurred_at, payload) "
                           "VALUES (?, ?, 'SubscriptionStarted', '2026-01-01T00:00:00+00:00', '{\"plan\": \"pro\"}')",
                           (str(uuid.uuid4()), str(old.command_id)))
        store = OutboxStore(db)
        store.migrate()
        store.migrate()
        store.accept([old, young])
        kept, _ = recorded_event(young.command_id)
        store.apply_outcomes([Outcome(command_id=young.command_id, status=CommandStatus.EXECUTED, event=kept)])
        before, after = store.get("acme", old.command_id), store.get("acme", young.command_id)
        assert before is not None and [e.payload for e in before.events] == [{"plan": "pro"}]
        assert after is not None and after.events[0].payload["plan"] == "pro"
        with db.transaction() as cursor:
            indexes = cursor.query(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'keel_command_events'" if db.is_postgres else
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'keel_command_events'")
        assert "keel_command_events_command" in {name for (name,) in indexes}
    finally:
        db.close()


def test_retention_prunes_old_published_commands_with_their_events_but_not_pending_approvals(
        store: OutboxStore) -> None:
    old_done, old_waiting, old_unsent, young = new(), new(), new(), new()
    store.accept([old_done, old_waiting, old_unsent])
    cutoff = time.time() + 0.001
    time.sleep(0.01)
    store.accept([young])
    store.mark_published([old_done.command_id, old_waiting.command_id, young.command_id])
    event = TrackedEvent(event_id=uuid.uuid4(), type="SubscriptionStarted",
                         occurred_at="2026-01-01T00:00:00+00:00", payload={})
    store.apply_outcomes([Outcome(command_id=old_done.command_id, status=CommandStatus.EXECUTED, event=event),
                          Outcome(command_id=old_waiting.command_id, status=CommandStatus.PENDING_APPROVAL)])
    assert store.prune(cutoff, limit=1) == 1
    assert store.prune(cutoff) == 0
    assert store.get("acme", old_done.command_id) is None
    for kept in (old_waiting, old_unsent, young):
        assert store.get("acme", kept.command_id) is not None
    with store.db.transaction() as cursor:
        assert cursor.query("SELECT count(*) FROM keel_command_events WHERE command_id = ?",
                            (str(old_done.command_id),)) == [(0,)]
    [again] = store.accept([old_done])  # a pruned id is forgotten: accepted as new
    assert again.status is CommandStatus.ACCEPTED and not again.replayed


def test_the_approvers_list_holds_the_tenants_parked_commands_only(store: OutboxStore) -> None:
    parked, other_tenant, executed, moved_on = new(), new(tenant="globex"), new(), new()
    store.accept([parked, other_tenant, executed, moved_on])

    def event(kind: str) -> TrackedEvent:
        return TrackedEvent(event_id=uuid.uuid4(), type=kind, occurred_at="2026-01-01T00:00:00+00:00", payload={})

    store.apply_outcomes([
        Outcome(command_id=c.command_id, status=CommandStatus.PENDING_APPROVAL, event=event("ApprovalRequested"))
        for c in (parked, other_tenant, moved_on)]
        + [Outcome(command_id=executed.command_id, status=CommandStatus.EXECUTED, event=event("SubscriptionStarted")),
           Outcome(command_id=moved_on.command_id, status=CommandStatus.EXECUTED)])
    assert [r.command_id for r in store.pending_approvals("acme")] == [parked.command_id]
    assert [r.command_id for r in store.pending_approvals("globex")] == [other_tenant.command_id]


def test_an_older_sqlite_outbox_gets_the_parked_index_in_place_of_the_index_of_every_status(
        tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with sqlite3.connect(path) as older:  # the index older versions made, on a table they filled
        older.execute("CREATE TABLE keel_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, command_id TEXT NOT NULL "
                      "UNIQUE, tenant_id TEXT NOT NULL, aggregate_key TEXT NOT NULL, command_type TEXT NOT NULL, "
                      "actor TEXT NOT NULL, request_hash TEXT NOT NULL, value BLOB NOT NULL, status TEXT NOT NULL, "
                      "reason_code TEXT, reason TEXT, created_at DOUBLE PRECISION NOT NULL, "
                      "updated_at DOUBLE PRECISION NOT NULL, published_at DOUBLE PRECISION)")
        older.execute("CREATE INDEX keel_outbox_tenant_status ON keel_outbox (tenant_id, status)")
    store = OutboxStore(open_database(f"sqlite:///{path}"))
    try:
        store.migrate()
        with store.db.transaction() as cursor:
            indexes = {name for (name,) in cursor.query(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'keel_outbox'")}
            plan = " ".join(str(row) for row in cursor.query(
                "EXPLAIN QUERY PLAN SELECT command_id FROM keel_outbox "
                "WHERE tenant_id = 'acme' AND status = 'pending_approval'"))
    finally:
        store.db.close()
    assert "keel_outbox_tenant_status" not in indexes and "keel_outbox_parked" in indexes
    assert "keel_outbox_parked" in plan


def test_a_rejection_keeps_its_code_and_reason(store: OutboxStore) -> None:
    row = new()
    store.accept([row])
    store.apply_outcomes([Outcome(command_id=row.command_id, status=CommandStatus.REJECTED,
                                  reason_code="refund_exceeds_paid", reason="too much")])
    record = store.get("acme", row.command_id)
    assert record is not None
    assert (record.status, record.reason_code, record.reason) == (CommandStatus.REJECTED,
                                                                  "refund_exceeds_paid", "too much")


def test_one_lease_holder_at_a_time_and_a_takeover_after_expiry(store: OutboxStore) -> None:
    first = store.acquire_lease("relay", "a", ttl_s=1.0)
    assert first is not None
    assert store.acquire_lease("relay", "b", ttl_s=1.0) is None
    assert store.acquire_lease("relay", "a", ttl_s=1.0) == first  # renewal keeps the epoch
    time.sleep(1.1)
    taken = store.acquire_lease("relay", "b", ttl_s=5)
    assert taken is not None and taken > first
    assert store.acquire_lease("relay", "a", ttl_s=5) is None
    store.release_lease("relay", "b")
    assert store.acquire_lease("relay", "a", ttl_s=5) is not None


def test_ingress_rejections_are_recorded_per_tenant(store: OutboxStore) -> None:
    store.record_rejection(tenant_id="acme", actor="agent:bot", code="wrong_tenant", field="tenant_id",
                           message="no", claimed_tenant="globex", command_id=None)
    [recorded] = store.rejections("acme")
    assert recorded["code"] == "wrong_tenant" and recorded["claimed_tenant"] == "globex"
    assert store.rejections("globex") == []


def test_the_sdk_enqueue_commits_and_rolls_back_with_the_callers_transaction(
        store: OutboxStore, dsn: str) -> None:
    kept, dropped = command("acme", "sub-1", start()), command("acme", "sub-2", start())
    if dsn.startswith("sqlite"):
        connection: object = sqlite3.connect(dsn.removeprefix("sqlite://"))
    else:
        connection = psycopg.connect(dsn)
    try:
        enqueue(connection, kept)
        connection.commit()  # type: ignore[attr-defined]
        enqueue(connection, dropped)
        connection.rollback()  # type: ignore[attr-defined]
        with pytest.raises(KeelError) as caught:
            enqueue(connection, command("acme", "sub-3", start(), command_id=kept.id))
        assert caught.value.code == "idempotency_conflict"
        connection.rollback()  # type: ignore[attr-defined]
    finally:
        connection.close()  # type: ignore[attr-defined]
    assert [p.command_id for p in store.unsent(10)] == [kept.id]


def test_replicas_racing_on_one_id_write_it_once(dsn: str) -> None:
    stores = [OutboxStore(open_database(dsn)) for _ in range(4)]
    stores[0].migrate()
    row, results = new(), []
    barrier = threading.Barrier(len(stores))

    def race(store: OutboxStore) -> None:
        barrier.wait()
        results.extend(store.accept([row]))
        store.db.close()

    threads = [threading.Thread(target=race, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.replayed for r in results) == [False, True, True, True]
    assert not any(r.conflict for r in results)
    check = OutboxStore(open_database(dsn))
    assert len(check.unsent(10)) == 1
    check.db.close()


def change(effect_id: uuid.UUID, stage: Stage, state: EffectState, generation: int = 0,
           attempts: int | None = 0, **fields: object) -> EffectChange:
    return EffectChange.model_validate({"tenant_id": "acme", "effect_id": effect_id, "aggregate_id": "sub-1",
                                        "generation": generation, "stage": stage, "state": state,
                                        "attempts": attempts, **fields})


def test_effects_fold_in_one_batch_new_changed_and_replayed(store: OutboxStore) -> None:
    known, fresh, settled = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    opened = [change(known, Stage.OPENED, EffectState.PENDING, provider="payments"),
              change(settled, Stage.SETTLED, EffectState.SUCCEEDED, attempts=1, result="{}")]
    assert store.apply_outcomes([], opened) == 2
    batch = [change(fresh, Stage.OPENED, EffectState.PENDING, provider="mail"),
             change(known, Stage.REPORTED, EffectState.RUNNING, seq=1, attempts=1),
             change(settled, Stage.OPENED, EffectState.PENDING, provider="payments", event_offset=7),  # late
             change(fresh, Stage.REPORTED, EffectState.RUNNING, seq=1, attempts=1),
             change(known, Stage.REPORTED, EffectState.RUNNING, seq=1, attempts=1)]  # a replay within it
    assert store.apply_outcomes([], batch) == 3  # fresh inserted; known moved; settled learns its offset
    assert store.apply_outcomes([], batch) == 0
    found = {i: record for i in (known, fresh, settled) if (record := store.effect("acme", i)) is not None}
    assert len(found) == 3
    assert (found[fresh].state, found[fresh].attempts, found[fresh].provider) == (EffectState.RUNNING, 1, "mail")
    assert (found[known].state, found[known].seq, found[known].provider) == (EffectState.RUNNING, 1, "payments")
    assert (found[settled].state, found[settled].event_offset) == (EffectState.SUCCEEDED, 7)
    assert store.effect("other", fresh) is None


def test_trackers_opening_one_effect_at_once_fold_both_changes(postgres_dsn: str) -> None:
    """The second insert of a new effect waits for the first transaction, then folds onto its row."""
    stores = [OutboxStore(open_database(postgres_dsn)) for _ in range(2)]
    stores[0].migrate()
    effect_id, inserted, done = uuid.uuid4(), threading.Event(), []
    report = change(effect_id, Stage.REPORTED, EffectState.RUNNING, seq=2, attempts=1)

    def second() -> None:
        inserted.wait(10)
        done.append(stores[1].apply_outcomes([], [report]))

    racer = threading.Thread(target=second)
    racer.start()
    with stores[0].db.transaction() as cursor:  # the first tracker, holding its insert uncommitted
        assert stores[0]._fold_all(cursor, [change(effect_id, Stage.OPENED, EffectState.PENDING,
                                                   provider="payments", event_offset=3)]) == 1
        inserted.set()
        time.sleep(0.5)  # the second now waits on this insert
        assert not done
    racer.join(10)
    assert done == [1]
    found = stores[0].effect("acme", effect_id)
    assert found is not None
    assert (found.state, found.seq, found.provider, found.event_offset) == (EffectState.RUNNING, 2, "payments", 3)
    for store in stores:
        store.db.close()


def wal_sizes(db: SQLiteDatabase, commits: int, pause_s: float = 0.0) -> list[int]:
    """Commit ``commits`` commands of two pages each; the WAL file's size after each commit."""
    store = OutboxStore(db)
    store.migrate()
    sizes = []
    for _ in range(commits):
        store.accept([new(body="x" * 2000)])
        sizes.append(Path(f"{db.path}-wal").stat().st_size)
        time.sleep(pause_s)
    assert len(store.unsent(commits + 1)) == commits
    return sizes


def test_sqlite_checkpoints_in_the_background_and_keeps_the_wal_small(tmp_path: Path) -> None:
    """Commits do not checkpoint (SQLite's auto-checkpoint is off), yet the WAL restarts.

    Without any checkpoint the WAL of these 600 commits would hold over a thousand pages.
    """
    db = SQLiteDatabase(tmp_path / "outbox.sqlite3", checkpoint_pages=50, checkpoint_interval_s=0.01)
    sizes = wal_sizes(db, 600, pause_s=0.001)  # a writer that pauses, as the gateway's does between batches
    with db.transaction() as cursor:
        assert cursor.query("PRAGMA wal_autocheckpoint") == [(0,)]
    # Far below the size at which commits would checkpoint themselves: the thread restarted it.
    assert max(sizes) < 4 * 50 * 4096, f"the WAL grew to {max(sizes)} bytes"
    deadline = time.monotonic() + 10
    while db._checkpointer is not None and time.monotonic() < deadline:  # idle: the thread ends by itself
        time.sleep(0.2)
    assert db._checkpointer is None
    db.close()


def test_sqlite_writers_keep_the_wal_bounded_when_the_checkpointer_falls_behind(tmp_path: Path) -> None:
    """A checkpointer that cannot keep up (here: one pass an hour) still leaves a bounded WAL."""
    db = SQLiteDatabase(tmp_path / "outbox.sqlite3", checkpoint_pages=50, checkpoint_interval_s=3600)
    sizes = wal_sizes(db, 1200)
    assert max(sizes) < 16 * 50 * 4096 + 20 * 4096, f"the WAL grew to {max(sizes)} bytes"
    db.close()
