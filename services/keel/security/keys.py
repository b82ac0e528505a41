"""Tenants and API keys: a key binds one tenant, one actor and roles; only its hash is stored.

A key reads ``keel_<key id>_<secret>``. The secret is 32 random bytes, so a plain SHA-256
is enough to store it (slow password hashes protect guessable secrets; this one is not),
and verifying it costs microseconds on the gateway's hot path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time

from pydantic import BaseModel, ConfigDict

from keel.domain.envelope import Actor, ActorKind
from keel.domain.principal import Principal
from keel.errors import KeelError, ValidationError
from keel.outbox.db import Database

_TOKEN = re.compile(r"^keel_([0-9a-f]{16})_([A-Za-z0-9_-]{20,100})$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


class AuthError(KeelError):
    """The request carries no API key, or one that is unknown, malformed or revoked."""

    code = "invalid_key"


class ApiKey(BaseModel):
    """A key's public description (never its secret)."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    tenant_id: str
    actor: Actor
    roles: frozenset[str]
    created_at: float
    revoked_at: float | None


class KeyStore:
    """Tenants and their API keys, in the outbox database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_tenant(self, tenant_id: str) -> bool:
        """Register a tenant; False when it already exists."""
        if not _TENANT.fullmatch(tenant_id):
            raise ValidationError(f"tenant id {tenant_id!r} is not a valid identifier", field="tenant_id")
        with self.db.transaction() as cursor:
            return bool(cursor.execute("INSERT INTO keel_tenants (tenant_id, created_at) VALUES (?, ?) "
                                       "ON CONFLICT (tenant_id) DO NOTHING", (tenant_id, time.time())))

    def tenants(self) -> list[str]:
        """Every registered tenant."""
        with self.db.transaction() as cursor:
            return [row[0] for row in cursor.query("SELECT tenant_id FROM keel_tenants ORDER BY tenant_id")]

    def create_key(self, tenant_id: str, actor: Actor, roles: frozenset[str] = frozenset()) -> tuple[ApiKey, str]:
        """A new key for ``actor`` in ``tenant_id``; returns it and the token, shown only once."""
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        now = time.time()
        with self.db.transaction() as cursor:
            if not cursor.query("SELECT 1 FROM keel_tenants WHERE tenant_id = ?", (tenant_id,)):
                raise KeelError(f"tenant {tenant_id!r} does not exist; create it with `keel tenants create`",
                                code="unknown_tenant", field="tenant_id")
            cursor.execute(
                "INSERT INTO keel_api_keys (key_id, tenant_id, actor_kind, actor_id, roles, secret_hash, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key_id, tenant_id, actor.kind.value, actor.id, json.dumps(sorted(roles)), _hash(secret), now))
        key = ApiKey(key_id=key_id, tenant_id=tenant_id, actor=actor, roles=roles, created_at=now, revoked_at=None)
        return key, f"keel_{key_id}_{secret}"

    def keys(self, tenant_id: str | None = None) -> list[ApiKey]:
        """Keys, of one tenant or all."""
        sql = "SELECT key_id, tenant_id, actor_kind, actor_id, roles, created_at, revoked_at FROM keel_api_keys"
        with self.db.transaction() as cursor:
            rows = (cursor.query(sql + " WHERE tenant_id = ? ORDER BY created_at", (tenant_id,)) if tenant_id
                    else cursor.query(sql + " ORDER BY tenant_id, created_at"))
        return [ApiKey(key_id=r[0], tenant_id=r[1], actor=Actor(kind=ActorKind(r[2]), id=r[3]),
                       roles=frozenset(json.loads(r[4])), created_at=r[5], revoked_at=r[6]) for r in rows]

    def revoke(self, key_id: str) -> bool:
        """Revoke a key; False when no live key has that id."""
        with self.db.transaction() as cursor:
            return bool(cursor.execute("UPDATE keel_api_keys SET revoked_at = ? WHERE key_id = ? "
                                       "AND revoked_at IS NULL", (time.time(), key_id)))

    def authenticate(self, token: str | None) -> Principal:
        """The principal a token stands for; raises ``AuthError`` otherwise."""
        if not token:
            raise AuthError("no API key: send `Authorization: Bearer <key>`", code="missing_key",
                            field="header.authorization")
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise AuthError("the API key is malformed", field="header.authorization")
        key_id, secret = match.groups()
        with self.db.transaction() as cursor:
            rows = cursor.query("SELECT tenant_id, actor_kind, actor_id, roles, secret_hash FROM keel_api_keys "
                                "WHERE key_id = ? AND revoked_at IS NULL", (key_id,))
        if not rows or not hmac.compare_digest(rows[0][4], _hash(secret)):
            raise AuthError("the API key is unknown or revoked", field="header.authorization")
        tenant, kind, actor_id, roles, _ = rows[0]
        return Principal(tenant_id=tenant, actor=Actor(kind=ActorKind(kind), id=actor_id),
                         roles=frozenset(json.loads(roles)))


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
