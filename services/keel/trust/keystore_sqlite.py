"""The SQLite data-key store: the default, one file beside the other local state."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

from keel.trust.keycache import KeyCache
from keel.trust.keystore import MasterKey, SqlKeyStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS keel_data_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    subject TEXT NOT NULL,
    wrapped BLOB,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    erased_at TEXT,
    erased_by TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS keel_data_keys_active
    ON keel_data_keys (tenant, subject) WHERE wrapped IS NOT NULL;
"""


class SqliteKeyStore(SqlKeyStore):
    """Data keys in a SQLite file, shared by every local process (gateway, processor, projector …).

    WAL, so a reader (the projector asking which keys are erased) never waits behind the
    durable commit of another process's new key; in rollback mode it did, and gave up with
    "database is locked" under load. ``synchronous=FULL``: a key lost in a power failure
    would leave ciphertext already in Kafka unreadable. ``secure_delete`` overwrites an
    erased key's bytes, and erasure checkpoints the WAL so no copy stays there.
    """

    def __init__(self, path: str | Path, master: MasterKey, previous: MasterKey | None = None,
                 cache: KeyCache | None = None) -> None:
        super().__init__(master, previous, cache)
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=30.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete = ON")  # overwrite deleted key bytes on disk
        self._db.executescript(SCHEMA)

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()

    def _stamp(self, when: datetime) -> str:
        return when.isoformat()

    def _erase(self, tenant: str, subject: str, erased_by: str, when: datetime) -> list[str]:
        ids = super()._erase(tenant, subject, erased_by, when)
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # no copy of the key bytes left in the WAL
        return ids

    def close(self) -> None:
        self._db.close()
