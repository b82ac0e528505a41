"""Console sign-in sessions, kept server-side in the outbox database (SQLite or PostgreSQL).

Why server-side: the browser must never hold the API key (not in a cookie, a URL or web
storage), and signing out or revoking the key must end the session at once. The cookie
holds a random session token; the table keeps only its SHA-256 (a database dump opens no
session), the key id it was opened with (a revoked key ends it: every look-up joins the
live keys) and a per-session CSRF token. The actor and roles are read from the key on every
request, so a change of roles applies without signing in again.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass

from keel.domain.envelope import Actor, ActorKind
from keel.domain.principal import Principal
from keel.outbox.db import Database

SESSION_TTL_S = 8 * 3600.0
"""A session lasts one working day, then its person signs in again."""

_DDL = (
    """CREATE TABLE IF NOT EXISTS keel_console_sessions (
        token_hash TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        csrf_token TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS keel_console_sessions_expiry ON keel_console_sessions (expires_at)",
)
_ADVISORY_LOCK = 7306735  # concurrent CREATE IF NOT EXISTS races in PostgreSQL (the outbox uses 7306734)


@dataclass(frozen=True)
class ConsoleSession:
    """A live session: who signed in (as their key says now) and the token every change must carry."""

    principal: Principal
    key_id: str
    csrf_token: str
    expires_at: float


class SessionStore:
    """Sessions in the outbox database; the table is created on first use, idempotently."""

    def __init__(self, db: Database, ttl_s: float = SESSION_TTL_S) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self._ready = False
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._ready:
            return
        with self._lock:
            with self.db.transaction() as cursor:
                if self.db.is_postgres:
                    cursor.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_LOCK,))
                for statement in _DDL:
                    cursor.execute(statement)
            self._ready = True  # only once committed

    def open(self, key_id: str) -> tuple[str, str]:
        """A new session for the key ``key_id``; returns its token (for the cookie) and its CSRF token.

        Expired sessions of every key are swept here, so the table never grows past the live ones.
        """
        self._ensure()
        token, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
        with self.db.transaction() as cursor:
            cursor.execute("DELETE FROM keel_console_sessions WHERE expires_at < ?", (now,))
            cursor.execute("INSERT INTO keel_console_sessions (token_hash, key_id, csrf_token, created_at, "
                           "expires_at) VALUES (?, ?, ?, ?, ?)", (_digest(token), key_id, csrf, now, now + self.ttl_s))
        return token, csrf

    def find(self, token: str | None) -> ConsoleSession | None:
        """The live session of ``token``; None when unknown, forged, expired or its key revoked."""
        if not token or len(token) > 200:
            return None
        self._ensure()
        with self.db.transaction() as cursor:
            rows = cursor.query(
                "SELECT k.tenant_id, k.actor_kind, k.actor_id, k.roles, s.key_id, s.csrf_token, s.expires_at "
                "FROM keel_console_sessions s JOIN keel_api_keys k ON k.key_id = s.key_id "
                "WHERE s.token_hash = ? AND s.expires_at > ? AND k.revoked_at IS NULL", (_digest(token), time.time()))
        if not rows:
            return None
        tenant, kind, actor_id, roles, key_id, csrf, expires = rows[0]
        principal = Principal(tenant_id=tenant, actor=Actor(kind=ActorKind(kind), id=actor_id),
                              roles=frozenset(json.loads(roles)))
        return ConsoleSession(principal=principal, key_id=key_id, csrf_token=csrf, expires_at=expires)

    def close(self, token: str | None) -> None:
        """Delete the session (signing out); unknown tokens are ignored."""
        if not token:
            return
        self._ensure()
        with self.db.transaction() as cursor:
            cursor.execute("DELETE FROM keel_console_sessions WHERE token_hash = ?", (_digest(token),))


def key_id_of(token: str) -> str:
    """The key id of an authenticated API key ``keel_<key id>_<secret>`` (``KeyStore`` checked its shape)."""
    return token.split("_", 2)[1]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
