"""The SQLite data-key store: the default, one file beside the other local state."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

from keel.trust.keystore import KeyRow, KeyStore, MasterKey

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


class SqliteKeyStore(KeyStore):
    """Data keys in a SQLite file (WAL; erasure vacuums so no freed page keeps key bytes)."""

    def __init__(self, path: str | Path, master: MasterKey) -> None:
        super().__init__(master)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA secure_delete = ON")  # overwrite deleted key bytes on disk
        self._db.executescript(SCHEMA)

    def _active(self, tenant: str, subject: str) -> KeyRow | None:
        row = self._db.execute("SELECT key_id, tenant, subject, wrapped FROM keel_data_keys "
                               "WHERE tenant = ? AND subject = ? AND wrapped IS NOT NULL",
                               (tenant, subject)).fetchone()
        return None if row is None else KeyRow(*row)

    def _insert(self, row: KeyRow) -> KeyRow:
        self._db.execute("INSERT INTO keel_data_keys (key_id, tenant, subject, wrapped) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT DO NOTHING", (row.key_id, row.tenant, row.subject, row.wrapped))
        active = self._active(row.tenant, row.subject)
        assert active is not None
        return active

    def _row(self, key_id: str) -> KeyRow | None:
        row = self._db.execute("SELECT key_id, tenant, subject, wrapped, erased_at, erased_by "
                               "FROM keel_data_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            return None
        erased_at = None if row[4] is None else datetime.fromisoformat(row[4])
        return KeyRow(row[0], row[1], row[2], row[3], erased_at, row[5])

    def _erase(self, tenant: str, subject: str, erased_by: str, when: datetime) -> list[str]:
        ids = [r[0] for r in self._db.execute(
            "UPDATE keel_data_keys SET wrapped = NULL, erased_at = ?, erased_by = ? "
            "WHERE tenant = ? AND subject = ? AND wrapped IS NOT NULL RETURNING key_id",
            (when.isoformat(), erased_by, tenant, subject)).fetchall()]
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return sorted(ids)

    def close(self) -> None:
        self._db.close()
