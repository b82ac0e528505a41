"""Opens a query session for a caller: their scope, a client bound to it, a bounded slot.

Shared by ``keel query`` and ``GET /v1/query``. Each query gets its own client (cheap on
chDB, its own session), so an analyst's session never touches the projector's; a tenant's
scope is prepared once per ``SCOPE_REUSE_S`` in a process, not on every query. A
``QueryGate`` caps concurrent queries: a caller beyond the cap is told to retry instead
of queueing, so analyst load can never starve the projector of the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from keel.config import Settings
from keel.errors import QueryError
from keel.projector.clickhouse import connect
from keel.query.run import QueryResult, run_query
from keel.query.scope import Scope, all_tenants_scope, forget_scope, prepared_scope


_UNKNOWN = frozenset({60, 81})
"""ClickHouse's UNKNOWN_TABLE and UNKNOWN_DATABASE."""


class QueryGate:
    """At most ``limit`` queries at once; more are refused with ``too_many_queries``."""

    def __init__(self, limit: int = 4) -> None:
        if limit < 1:
            raise ValueError("a query gate needs at least one slot")
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of a query."""
        if not self._slots.acquire(blocking=False):
            raise QueryError(f"{self.limit} queries are already running; retry shortly",
                             code="too_many_queries")
        try:
            yield
        finally:
            self._slots.release()


def execute(
    settings: Settings, sql: str, *, tenant: str | None, limit: int, timeout_s: float,
    gate: QueryGate | None = None, parameters: Mapping[str, Any] | None = None, may_host: bool = True,
) -> QueryResult:
    """Run ``sql`` for ``tenant`` (``None``: every tenant, for ops) within the gate's bound.

    ``may_host``: whether this process may open the embedded engine when no owner serves it
    (a one-shot CLI may; the gateway may not: ``keel.projector.clickhouse.connect``).
    One client prepares the scope (once per ``SCOPE_REUSE_S``, see ``prepared_scope``) and runs the query.
    """
    with (gate or QueryGate(1)).slot():
        client = connect(settings, may_host=may_host)
        try:
            if tenant is None:
                return _run(client, all_tenants_scope(settings.clickhouse_database), sql, limit=limit,
                            timeout_s=timeout_s, parameters=parameters)
            key = (settings.analytics_dsn, settings.clickhouse_database, tenant)
            scope, reused = prepared_scope(client, key)
            try:
                return _run(client, scope, sql, limit=limit, timeout_s=timeout_s, parameters=parameters)
            except QueryError as exc:
                if not (reused and _scope_vanished(exc)):
                    raise
            forget_scope(key)  # its database or views were dropped since: prepare them again, once
            client.database = settings.clickhouse_database  # the session left the vanished database
            scope, _ = prepared_scope(client, key)
            return _run(client, scope, sql, limit=limit, timeout_s=timeout_s, parameters=parameters)
        finally:
            client.close()


def run_in_scope(settings: Settings, scope: Scope, sql: str, *, limit: int, timeout_s: float,
                 parameters: Mapping[str, Any] | None = None, may_host: bool = True) -> QueryResult:
    """Run ``sql`` on a fresh client whose default database is the scope's."""
    client = connect(settings, may_host=may_host)
    try:
        return _run(client, scope, sql, limit=limit, timeout_s=timeout_s, parameters=parameters)
    finally:
        client.close()


def _run(client: Client, scope: Scope, sql: str, *, limit: int, timeout_s: float,
         parameters: Mapping[str, Any] | None) -> QueryResult:
    client.database = scope.database
    return run_query(client, sql, scope=scope, limit=limit, timeout_s=timeout_s, parameters=parameters)


def _scope_vanished(exc: QueryError) -> bool:
    """Whether the engine no longer knows the scope's database or one of its views."""
    cause = exc.__cause__
    return isinstance(cause, DatabaseError) and getattr(cause, "code", None) in _UNKNOWN
