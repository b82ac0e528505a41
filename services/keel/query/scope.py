"""Tenant scopes: the only tables an analyst query can name, already filtered to one tenant.

Threat model: the analyst is authenticated and bound to one tenant, and writes arbitrary SQL
text. On chDB there are no users or row policies, so isolation is built from names: each
tenant gets its own database (``<db>__t_<hash>``) holding one view per exposed projection,
``SELECT * FROM <db>.<view> WHERE tenant_id = '<tenant>'``, and the query runs with that
database as its default. The guard (``keel.query.guard``) then proves from ClickHouse's own
resolved query tree that every table the query reads is one of those views: a database
prefix, ``system.*``, ``information_schema``, a table function or a table-reading scalar
function is refused before anything runs. Ops can choose the all-tenants scope explicitly:
the base database, same allow-list, same guard.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass

from clickhouse_connect.driver.binding import format_query_value, quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from keel.domains.registry import current
from keel.errors import InfraError, QueryError

CORE_VIEWS: tuple[str, ...] = (
    "events", "commands", "command_lifecycle", "approvals", "agent_activity", "tenant_metrics",
)


def exposed() -> tuple[str, ...]:
    """What analysts may read: Keel's views and every registered domain's (``Domain.views``)."""
    return CORE_VIEWS + tuple(view for domain in current().domains for view in domain.views)

# Log tables may hold a row twice until a merge; analysts see each once.
_FINAL = frozenset({"events", "commands"})
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


@dataclass(frozen=True)
class Scope:
    """Where a query runs and what it may read: ``tables`` of ``database``, for ``tenant``."""

    database: str
    tables: frozenset[str]
    tenant: str | None

    @property
    def qualified(self) -> frozenset[str]:
        """The tables as the query tree names them, ``database.table``."""
        return frozenset(f"{self.database}.{table}" for table in self.tables)


def scoped_database(base: str, tenant: str) -> str:
    """The name of ``tenant``'s scoped database; it changes when the exposed set changes."""
    digest = hashlib.sha256("\0".join((tenant, *exposed())).encode()).hexdigest()[:20]
    return f"{base}__t_{digest}"


def all_tenants_scope(base: str) -> Scope:
    """The base database itself, every tenant's rows: for ops only, chosen explicitly."""
    return Scope(database=base, tables=frozenset(exposed()), tenant=None)


def tenant_scope(admin: Client, base: str, tenant: str) -> Scope:
    """``tenant``'s scope, creating its database and views if missing (``admin`` may write)."""
    if not _TENANT.fullmatch(tenant):
        raise QueryError(f"{tenant!r} is not a valid tenant id", code="invalid_tenant")
    database = scoped_database(base, tenant)
    present = _tables(admin, base)
    tables = frozenset(name for name in exposed() if name in present)
    try:
        admin.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
        for name in sorted(tables):
            final = " FINAL" if name in _FINAL else ""
            admin.command(
                f"CREATE VIEW IF NOT EXISTS {quote_identifier(database)}.{quote_identifier(name)} AS "
                f"SELECT * FROM {quote_identifier(base)}.{quote_identifier(name)}{final} "
                f"WHERE tenant_id = {format_query_value(tenant)}")
    except ClickHouseError as exc:
        raise InfraError(f"cannot prepare the query scope of tenant {tenant}: {exc}",
                         code="scope_unavailable") from exc
    return Scope(database=database, tables=tables, tenant=tenant)


SCOPE_REUSE_S = 30.0
"""How long a process reuses a tenant's prepared scope before it lists the projections and ensures the
views again: a projection added meanwhile becomes queryable within this bound."""
ScopeKey = tuple[str, str, str]
"""The engine (its DSN), the base database and the tenant."""
_prepared: dict[ScopeKey, tuple[float, Scope]] = {}
_prepared_lock = threading.Lock()


def prepared_scope(admin: Client, key: ScopeKey) -> tuple[Scope, bool]:
    """The scope of ``key``'s tenant, and whether it was reused: ``tenant_scope`` asks the engine about
    ten times (tables, database, a view per projection), which would otherwise cost every query."""
    now = time.monotonic()
    with _prepared_lock:
        known = _prepared.get(key)
    if known is not None and now - known[0] < SCOPE_REUSE_S:
        return known[1], True
    _, base, tenant = key
    scope = tenant_scope(admin, base, tenant)
    with _prepared_lock:
        _prepared[key] = (now, scope)
    return scope, False


def forget_scope(key: ScopeKey) -> None:
    """Prepare ``key``'s scope afresh next time (its database or views were dropped)."""
    with _prepared_lock:
        _prepared.pop(key, None)


def _tables(client: Client, database: str) -> set[str]:
    try:
        rows = client.query("SELECT name FROM system.tables WHERE database = {db:String}",
                            parameters={"db": database}).result_rows
    except ClickHouseError as exc:
        raise InfraError(f"cannot list the projections of {database}: {exc}",
                         code="projection_unavailable") from exc
    if "events" not in {str(name) for (name,) in rows}:
        raise QueryError(f"no projections in {database}; run `keel projections migrate` first",
                         code="projections_missing")
    return {str(name) for (name,) in rows}
