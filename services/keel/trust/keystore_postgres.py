"""The PostgreSQL data-key store: production, through the same contract suite as SQLite."""

from __future__ import annotations

from datetime import datetime

import psycopg

from keel.trust.keystore import KeyRow, KeyStore, MasterKey

SCHEMA = """
CREATE TABLE IF NOT EXISTS keel_data_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    subject TEXT NOT NULL,
    wrapped BYTEA,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    erased_at TIMESTAMPTZ,
    erased_by TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS keel_data_keys_active
    ON keel_data_keys (tenant, subject) WHERE wrapped IS NOT NULL;
"""


class PostgresKeyStore(KeyStore):
    """Data keys in PostgreSQL (autocommit: every statement is its own transaction)."""

    def __init__(self, dsn: str, master: MasterKey) -> None:
        super().__init__(master)
        self._db = psycopg.connect(dsn, autocommit=True)
        self._db.execute(SCHEMA)

    def _active(self, tenant: str, subject: str) -> KeyRow | None:
        row = self._db.execute("SELECT key_id, tenant, subject, wrapped FROM keel_data_keys "
                               "WHERE tenant = %s AND subject = %s AND wrapped IS NOT NULL",
                               (tenant, subject)).fetchone()
        return None if row is None else KeyRow(row[0], row[1], row[2], bytes(row[3]))

    def _insert(self, row: KeyRow) -> KeyRow:
        self._db.execute("INSERT INTO keel_data_keys (key_id, tenant, subject, wrapped) VALUES (%s, %s, %s, %s) "
                         "ON CONFLICT DO NOTHING", (row.key_id, row.tenant, row.subject, row.wrapped))
        active = self._active(row.tenant, row.subject)
        assert active is not None
        return active

    def _row(self, key_id: str) -> KeyRow | None:
        row = self._db.execute("SELECT key_id, tenant, subject, wrapped, erased_at, erased_by "
                               "FROM keel_data_keys WHERE key_id = %s", (key_id,)).fetchone()
        if row is None:
            return None
        return KeyRow(row[0], row[1], row[2], None if row[3] is None else bytes(row[3]), row[4], row[5])

    def _erase(self, tenant: str, subject: str, erased_by: str, when: datetime) -> list[str]:
        rows = self._db.execute(
            "UPDATE keel_data_keys SET wrapped = NULL, erased_at = %s, erased_by = %s "
            "WHERE tenant = %s AND subject = %s AND wrapped IS NOT NULL RETURNING key_id",
            (when, erased_by, tenant, subject)).fetchall()
        return sorted(r[0] for r in rows)

    def close(self) -> None:
        self._db.close()
