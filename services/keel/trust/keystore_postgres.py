"""The PostgreSQL data-key store: production, through the same contract suite as SQLite."""

from __future__ import annotations

from typing import Any

import psycopg

from keel.trust.keycache import KeyCache
from keel.trust.keystore import MasterKey, SqlKeyStore

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


class PostgresKeyStore(SqlKeyStore):
    """Data keys in PostgreSQL (autocommit: every statement is its own transaction)."""

    def __init__(self, dsn: str, master: MasterKey, previous: MasterKey | None = None,
                 cache: KeyCache | None = None) -> None:
        super().__init__(master, previous, cache)
        self._db = psycopg.connect(dsn, autocommit=True)
        self._db.execute(SCHEMA)

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        cursor = self._db.execute(sql.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description is not None else []

    def close(self) -> None:
        self._db.close()
