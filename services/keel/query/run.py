"""Runs an admitted analyst query within its scope, with a row limit and cost bounds, as a plain result.

The ``limit`` setting caps the outermost result in the engine (one extra row tells us
the result was cut), ``max_execution_time``, ``max_rows_to_read`` and ``max_memory_usage``
bound the work, and ``readonly=1`` comes last so the settings before it may still be set.
The client must run in ``scope.database`` (see ``keel.query.service``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError

from keel.errors import QueryError
from keel.query.guard import admit
from keel.query.scope import Scope, all_tenants_scope

_TIMEOUT_EXCEEDED = 159
_READONLY = 164
_TOO_EXPENSIVE = frozenset({158, 241, 307, 396})  # too many rows / bytes read, memory limit
MAX_ROWS_TO_READ = 200_000_000
MAX_MEMORY_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a query; ``truncated`` when the limit cut further rows."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    truncated: bool = False
    types: tuple[str, ...] = ()
    """The columns' ClickHouse types (``Nullable(UInt64)``...): Arrow and Parquet answers are typed by them."""


def run_query(
    client: Client, sql: str, *, limit: int, timeout_s: float, scope: Scope | None = None,
    parameters: Mapping[str, Any] | None = None, max_rows_to_read: int = MAX_ROWS_TO_READ,
) -> QueryResult:
    """Run ``sql`` if it is one read-only SELECT over ``scope``; at most ``limit`` rows and ``timeout_s``.

    Without a ``scope`` the query may read every tenant's projections in the client's
    database (ops and internal callers); analysts always get a tenant scope.

    ``parameters`` fill ``{name:Type}`` placeholders server-side, never by string splicing.
    """
    if limit < 1:
        raise QueryError(f"the row limit must be at least 1, got {limit}", code="invalid_limit")
    if timeout_s <= 0:
        raise QueryError(f"the timeout must be positive, got {timeout_s}", code="invalid_timeout")
    settings: dict[str, Any] = {"max_execution_time": timeout_s, "max_rows_to_read": max_rows_to_read,
                                "max_memory_usage": MAX_MEMORY_BYTES, "limit": limit + 1, "readonly": 1}
    statement = admit(client, sql, scope or all_tenants_scope(str(client.database)), parameters, settings)
    bound = dict(parameters or {})
    try:
        result = client.query(statement, parameters=bound, settings=settings)
    except DatabaseError as exc:
        raise _failed(exc, timeout_s) from exc
    except ClickHouseError as exc:
        raise QueryError(f"the query failed: {exc}", code="query_failed") from exc
    rows = result.result_rows
    if result.column_names:
        columns, types = tuple(result.column_names), tuple(t.name for t in result.column_types)
    else:
        columns, types = _described_columns(client, statement, bound, settings)
    return QueryResult(
        columns=columns,
        rows=tuple(tuple(row) for row in rows[:limit]),
        truncated=len(rows) > limit,
        types=types,
    )


def _described_columns(
    client: Client, statement: str, parameters: dict[str, Any], settings: dict[str, Any]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Column names and types of an empty result: chDB sends no header block when there are no rows."""
    try:
        described = client.query(f"DESCRIBE ({statement})", parameters=parameters, settings=settings)
    except DatabaseError as exc:
        raise _failed(exc, float(settings["max_execution_time"])) from exc
    return (tuple(str(row[0]) for row in described.result_rows),
            tuple(str(row[1]) for row in described.result_rows))


def _failed(exc: DatabaseError, timeout_s: float) -> QueryError:
    if exc.code == _TIMEOUT_EXCEEDED:
        return QueryError(f"the query ran longer than {timeout_s:g}s and was stopped", code="timeout")
    if exc.code in _TOO_EXPENSIVE:
        return QueryError(f"the query needs more than its budget (rows read, memory); narrow it: {exc}",
                          code="too_expensive")
    if exc.code == _READONLY:
        return QueryError(f"the query tried to write or change settings: {exc}", code="not_read_only")
    return QueryError(f"the query failed: {exc}", code="query_failed")
