"""Builds clickhouse-connect clients for the analytics database, embedded chDB or a server.

One DSN scheme picks the engine: ``chdb:///path`` runs ClickHouse in-process, ``http://``
talks to a server; the SQL is the same. Every call returns a new client: on chDB clients
are cheap (~10 ms) handles onto the one engine a process may host, and a client's session
(``USE``, ``SET``) is its own, so the projector and the query API never share session state.
chDB refuses a second data path in one process and a data path another process owns;
both surface here as a typed ``InfraError`` instead of the engine's terse message. When
another process owns the path and serves it (``keel.analytics.owner``: the projector
does), the client talks to that owner over its local HTTP address instead.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, ProgrammingError

from keel.analytics import allocator
from keel.analytics.owner import served_dsn
from keel.config import Settings
from keel.errors import InfraError


_HOSTED: set[str] = set()
"""The chDB DSNs this process opened: it owns their engine, and connects to it directly."""


def connect(settings: Settings, *, may_host: bool = True) -> Client:
    """A new client on ``settings.clickhouse_database``, creating the database if missing.

    On chDB, the engine's owner serves it when another process owns it; otherwise this
    process opens it, unless ``may_host`` is false (a long-lived service, the gateway, must
    never take the engine from the projector): then ``analytics_unavailable``.
    """
    dsn = settings.analytics_dsn
    database = settings.clickhouse_database
    served = None
    if dsn.startswith("chdb:") and dsn not in _HOSTED:
        served = served_dsn(settings)
        if served is not None:
            dsn = served
        elif not may_host:
            raise InfraError("the embedded ClickHouse is served by the projector and none is running; start "
                             "`keel dev` or `keel project --follow`", code="analytics_unavailable")
        else:
            allocator.configure()  # this process loads chDB and hosts the engine
    try:
        # "schema": DateTime64(6, 'UTC') columns come back as aware UTC datetimes, like the domain's
        client = (clickhouse_connect.get_client(dsn=dsn, tz_mode="schema") if served is None else
                  # the owner's server keeps no sessions; without an id a client may serve several threads
                  clickhouse_connect.get_client(dsn=dsn, tz_mode="schema", autogenerate_session_id=False))
    except ProgrammingError as exc:
        raise _engine_unavailable(dsn, exc) from exc
    except ClickHouseError as exc:
        raise InfraError(f"cannot reach ClickHouse at {shown_dsn(dsn)}: {exc}", code="clickhouse_unavailable") from exc
    try:
        client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
    except ClickHouseError as exc:
        client.close()
        raise InfraError(f"cannot create database {database!r} at {shown_dsn(dsn)}: {exc}",
                         code="clickhouse_unavailable") from exc
    client.database = database
    if dsn.startswith("chdb:"):
        _HOSTED.add(dsn)
    return client


def _engine_unavailable(dsn: str, exc: Exception) -> InfraError:
    if dsn.startswith("chdb:"):
        return InfraError(
            f"the embedded ClickHouse (chDB) at {dsn} cannot be opened: another process owns "
            "this data path (e.g. a running `keel project --follow`), or this process already "
            "has a different chDB path open. Stop the other process, or point "
            f"KEEL_CLICKHOUSE_DSN at a ClickHouse server. Engine said: {exc}",
            code="chdb_path_in_use",
        )
    return InfraError(f"cannot build a ClickHouse client for {shown_dsn(dsn)}: {exc}", code="clickhouse_unavailable")


def shown_dsn(dsn: str) -> str:
    """``dsn`` fit for an error message or a log: its password, if it has one, masked."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
