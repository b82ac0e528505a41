"""Checking a ``--tenant``: a typo must be an error, not an empty table or a zero.

A tenant is known when it is registered (``keel tenants create``) or when the data a
command reads has a trace of it: tenants made only through the SDK are never registered
and must keep working.
"""

from __future__ import annotations

from keel.config import Settings
from keel.errors import KeelError
from keel.gateway.settings import IngressSettings
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.security.keys import KeyStore


def registered(settings: Settings, tenant: str) -> bool:
    """Whether ``tenant`` is in the key store's tenant registry."""
    db = open_database(IngressSettings().dsn(settings))
    try:
        OutboxStore(db).migrate()
        return tenant in KeyStore(db).tenants()
    finally:
        db.close()


def require_known(settings: Settings, tenant: str, *, seen: bool) -> None:
    """Raise ``unknown_tenant`` unless the data has a trace of ``tenant`` (``seen``) or it is registered."""
    if not seen and not registered(settings, tenant):
        raise KeelError(f"unknown tenant {tenant!r}: it is not registered (see `keel tenants list`) "
                        "and the data has no trace of it", code="unknown_tenant", field="tenant")
