"""Opens a query session for a caller: their scope, a client bound to it, a bounded slot.

Shared by ``keel query`` and ``GET /v1/query``. Each query holds a client of its own, so an
analyst's session never touches the projector's. Clients of an engine reached over HTTP (the
projector's served chDB, a ClickHouse server) are kept between queries (``ClientPool``): a
new one asks the engine three questions before its first query. A tenant's scope is prepared
once per ``SCOPE_REUSE_S`` in a process, not on every query. A ``QueryGate`` caps concurrent
queries: a caller beyond the cap is told to retry instead of queueing, so analyst load can
never starve the projector of the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from clickhouse_connect.driver.httpclient import HttpClient

from keel.analytics.owner import published_dsn
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


class ClientPool:
    """Idle clients of HTTP engines, reused by later queries of this process.

    A new clickhouse-connect client reads the engine's version and every setting, and the
    database is created if missing, before its first query: more than the guard and the query
    together cost the engine. A client goes back to the pool after its query ran or was
    refused (``QueryError``), and is closed after any other failure; clients of a projector
    that has since moved to another address, or stopped, are closed when the next query looks.
    Clients of a chDB engine this process hosts are not kept: they are cheap, and bound to the
    engine's session.
    """

    def __init__(self, idle_per_engine: int = 8) -> None:
        self.idle_per_engine = idle_per_engine
        self._idle: dict[tuple[str, str], list[HttpClient]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def lease(self, settings: Settings, *, may_host: bool) -> Iterator[Client]:
        """A client on ``settings``' engine and database, for this caller alone until the block ends."""
        key = (settings.analytics_dsn, settings.clickhouse_database)
        client = self._take(key, settings)
        if client is None:
            client = connect(settings, may_host=may_host)
        else:
            client.database = settings.clickhouse_database  # the last query left it in a tenant's scope
        try:
            yield client
        except QueryError:  # the engine answered: the client is as good as before
            self._give(key, client)
            raise
        except BaseException:
            client.close()
            raise
        self._give(key, client)

    def idle(self) -> int:
        """How many clients wait for a query."""
        with self._lock:
            return sum(len(clients) for clients in self._idle.values())

    def close(self) -> None:
        """Close every idle client."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for clients in idle.values():
            for client in clients:
                client.close()

    def _take(self, key: tuple[str, str], settings: Settings) -> Client | None:
        served = settings.analytics_dsn.startswith("chdb:")
        address = published_dsn(settings) if served else None  # where the projector serves now, if any
        with self._lock:
            clients = self._idle.get(key, [])
            moved = [client for client in clients if served and client.url != address]
            for old in moved:
                clients.remove(old)
            client = clients.pop() if clients else None
        for old in moved:
            old.close()
        return client

    def _give(self, key: tuple[str, str], client: Client) -> None:
        if isinstance(client, HttpClient):
            with self._lock:
                clients = self._idle.setdefault(key, [])
                if len(clients) < self.idle_per_engine:
                    clients.append(client)
                    return
        client.close()


CLIENTS = ClientPool()
"""The process's pool: the gateway's analyst queries share it."""


def execute(
    settings: Settings, sql: str, *, tenant: str | None, limit: int, timeout_s: float,
    gate: QueryGate | None = None, parameters: Mapping[str, Any] | None = None, may_host: bool = True,
) -> QueryResult:
    """Run ``sql`` for ``tenant`` (``None``: every tenant, for ops) within the gate's bound.

    ``may_host``: whether this process may open the embedded engine when no owner serves it
    (a one-shot CLI may; the gateway may not: ``keel.projector.clickhouse.connect``).
    One client prepares the scope (once per ``SCOPE_REUSE_S``, see ``prepared_scope``) and runs the query.
    """
    with (gate or QueryGate(1)).slot(), CLIENTS.lease(settings, may_host=may_host) as client:
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


def _run(client: Client, scope: Scope, sql: str, *, limit: int, timeout_s: float,
         parameters: Mapping[str, Any] | None) -> QueryResult:
    client.database = scope.database
    return run_query(client, sql, scope=scope, limit=limit, timeout_s=timeout_s, parameters=parameters)


def _scope_vanished(exc: QueryError) -> bool:
    """Whether the engine no longer knows the scope's database or one of its views."""
    cause = exc.__cause__
    return isinstance(cause, DatabaseError) and getattr(cause, "code", None) in _UNKNOWN
