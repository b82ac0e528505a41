"""One contract suite for the data-key store, run against every adapter (SQLite, PostgreSQL)."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.trust.errors import KeyUnwrapFailed, UnknownKey, WrongTenantKey
from keel.trust.keystore import KeyStore, MasterKey, RotationReport
from keel.trust.keystore_postgres import PostgresKeyStore
from keel.trust.keystore_sqlite import SqliteKeyStore

pytestmark = pytest.mark.integration

MASTER = MasterKey(os.urandom(32))


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the adapter under test keeps its keys (a PostgreSQL database per test)."""
    if request.param == "sqlite":
        return str(tmp_path / "keys.db")
    return str(request.getfixturevalue("postgres_dsn"))


def open_store(location: str, master: MasterKey = MASTER, previous: MasterKey | None = None) -> KeyStore:
    if location.startswith("postgresql://"):
        return PostgresKeyStore(location, master, previous)
    return SqliteKeyStore(location, master, previous)


@pytest.fixture
def store(location: str) -> Iterator[KeyStore]:
    with open_store(location) as keys:
        yield keys


def test_a_subject_has_one_active_key_that_survives_reopening(store: KeyStore, location: str) -> None:
    first = store.key_for("acme", "cust-1")
    assert store.key_for("acme", "cust-1") == first and len(first.key) == 32
    assert store.key_for("acme", "cust-2").key_id != first.key_id
    assert store.key_for("globex", "cust-1").key_id != first.key_id  # subjects are per tenant
    with open_store(location) as again:
        assert again.lookup("acme", first.key_id) == first


def test_concurrent_first_use_agrees_on_one_key(store: KeyStore, location: str) -> None:
    seen: list[str] = []

    def use() -> None:
        with open_store(location) as own:
            seen.append(own.key_for("acme", "cust-race").key_id)

    threads = [threading.Thread(target=use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1 and store.key_for("acme", "cust-race").key_id == seen[0]


def test_erasure_tombstones_the_key_and_names_who_and_when(store: KeyStore) -> None:
    before = datetime.now(UTC)
    key = store.key_for("acme", "cust-1")
    other = store.key_for("acme", "cust-2")
    assert store.erase("acme", "cust-1", "human:dpo") == [key.key_id]
    assert store.lookup("acme", key.key_id) is None
    row = store.tombstone(key.key_id)
    assert row is not None and row.wrapped is None and row.erased_by == "human:dpo"
    assert row.erased_at is not None and before <= row.erased_at <= datetime.now(UTC)
    assert store.lookup("acme", other.key_id) == other
    assert store.erase("acme", "cust-1", "human:dpo") == []


def test_erased_names_the_tombstoned_keys_among_any_ids_without_a_master_key_that_fits(location: str) -> None:
    with open_store(location) as store:
        gone, kept = store.key_for("acme", "cust-1"), store.key_for("globex", "cust-2")
        store.erase("acme", "cust-1", "human:dpo")
        strangers = [f"{i:032x}" for i in range(1200)]  # more ids than one statement binds
    with open_store(location, MasterKey(os.urandom(32))) as stranger:
        assert stranger.erased([kept.key_id, gone.key_id, *strangers]) == {gone.key_id}
        assert stranger.erased([]) == frozenset()


def test_unknown_key_wrong_tenant_and_wrong_master_are_typed_errors(store: KeyStore, location: str) -> None:
    key = store.key_for("acme", "cust-1")
    with pytest.raises(UnknownKey):
        store.lookup("acme", "f" * 32)
    with pytest.raises(WrongTenantKey):
        store.lookup("globex", key.key_id)
    with open_store(location, MasterKey(os.urandom(32))) as stranger, pytest.raises(KeyUnwrapFailed):
        stranger.lookup("acme", key.key_id)


def test_key_material_is_stored_wrapped_never_in_clear(store: KeyStore, location: str) -> None:
    key = store.key_for("acme", "cust-1")
    row = store.tombstone(key.key_id)
    assert row is not None and row.wrapped is not None and key.key not in row.wrapped
    if not location.startswith("postgresql://"):
        store.close()
        assert key.key not in Path(location).read_bytes()


def test_rotating_the_master_key_rewraps_old_keys_and_leaves_erasures_and_strangers(location: str) -> None:
    new = MasterKey(os.urandom(32))
    with open_store(location) as before:
        kept, other, gone = (before.key_for("acme", "cust-1"), before.key_for("globex", "cust-2"),
                             before.key_for("acme", "cust-3"))
        before.erase("acme", "cust-3", "human:dpo")
    with open_store(location, MasterKey(os.urandom(32))) as stranger:  # a root nobody configured
        stray = stranger.key_for("acme", "cust-9")

    with open_store(location, new, previous=MASTER) as during:
        assert during.lookup("acme", kept.key_id) == kept  # the old root still unwraps
        fresh = during.key_for("acme", "cust-4")  # wrapped by the new root
        report = during.rotate(batch=2)

    assert report == RotationReport(rewrapped=2, current=1, unreadable=(stray.key_id,))
    with open_store(location, new) as after:
        assert [after.lookup(k.tenant, k.key_id) for k in (kept, other, fresh)] == [kept, other, fresh]
        assert after.lookup("acme", gone.key_id) is None
    with open_store(location) as retired, pytest.raises(KeyUnwrapFailed):
        retired.lookup("acme", kept.key_id)


def test_a_reader_is_not_held_up_by_another_process_writing_the_sqlite_store(tmp_path: Path) -> None:
    """The projector asks which keys are erased while the gateway and processor commit new keys:
    a write in progress elsewhere (here one that holds its lock) must not make that read wait or fail."""
    import sqlite3
    import time

    path = tmp_path / "keys.db"
    with SqliteKeyStore(path, MASTER) as writer_side, SqliteKeyStore(path, MASTER) as reader:
        known = writer_side.key_for("acme", "cust-1")
        other = sqlite3.connect(path, isolation_level=None)  # another process, mid-commit
        other.execute("BEGIN EXCLUSIVE")
        other.execute("INSERT INTO keel_data_keys (key_id, tenant, subject, wrapped) VALUES ('k', 'acme', 's', x'00')")
        try:
            started = time.monotonic()
            assert reader.erased([known.key_id]) == frozenset()
            assert time.monotonic() - started < 1.0
        finally:
            other.execute("ROLLBACK")
            other.close()
