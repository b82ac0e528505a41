"""``GET /v1/query``: the analyst query API, as a router the gateway mounts.

The caller's tenant comes only from their principal (their API key), never from a
parameter: the query runs in that tenant's scope (``keel.query.scope``). Only principals
with the ``analyst`` role may query. Queries run in a worker thread behind a ``QueryGate``,
so a burst of analysts is told to retry (429) rather than piling onto the engine.

Answers are JSON, CSV, an Arrow IPC stream or Parquet (``format``; ``keel.query.columnar``
types the columns for dataframes); refusals are always JSON ``{"error": {...}}``.
"""

# No ``from __future__ import annotations``: FastAPI must see the route's annotations as
# objects, and they name the factory's local ``principal_dependency``.
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from keel.config import Settings
from keel.domain.principal import Principal
from keel.errors import KeelError
from keel.gateway.schemas import ERROR_CONTENT, KEYED, error_responses
from keel.query.render import ARROW_MEDIA_TYPE, PARQUET_MEDIA_TYPE, to_csv, to_json
from keel.query.run import QueryResult
from keel.query.service import QueryGate, execute

ANALYST_ROLE = "analyst"
MAX_LIMIT = 100_000
MAX_TIMEOUT_S = 60.0
MIN_TIMEOUT_S = 0.001
"""ClickHouse refuses a denormal ``max_execution_time`` (e.g. 5e-324): below a millisecond is a 422 here."""
MAX_REQUEST_TARGET_BYTES = 65_535
"""The longest request target (path and query string) uvicorn's httptools parser takes (its URL
offsets are 16-bit); beyond it uvicorn answers a plain-text 400 before the gateway sees the request."""
MAX_SQL_CHARS = 5_000
"""The longest ``sql``: even as 4-byte UTF-8 characters, each percent-encoded into 12 bytes, it and
the other parameters fit ``MAX_REQUEST_TARGET_BYTES``, so every query the OpenAPI document allows
reaches the gateway, and a longer one is its typed 422 (not uvicorn's plain-text 400)."""

_STATUS = {"forbidden": 403, "too_many_queries": 429}
"""Other refusals are 503 (the engine is away) or 400: a query that runs past the caller's own
``timeout`` is told so like one past the row and memory budget (``too_expensive``), as a 4xx."""
READ_REFUSALS = frozenset({"table_not_allowed", "function_not_allowed", "not_read_only"})
"""Refusals of a query that reaches outside the caller's projections: recorded as security events."""


class QueryFormat(StrEnum):
    """What ``GET /v1/query`` answers with."""

    JSON = "json"
    CSV = "csv"
    ARROW = "arrow"
    PARQUET = "parquet"


class QueryRows(BaseModel):
    """A query's answer in JSON: rows as arrays next to the column names, so order and duplicates survive."""

    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = Field(description="True when the limit cut further rows.")


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"model": QueryRows, "description": "The rows, in the format asked for.", "content": {
        "text/csv": {"schema": {"type": "string"}},
        ARROW_MEDIA_TYPE: _BINARY,
        PARQUET_MEDIA_TYPE: _BINARY}},
    **error_responses(*KEYED, "schema_violation"),
    400: {"description": "The query is refused before it runs (table_not_allowed, function_not_allowed, "
                         "clause_not_allowed, multi_statement, not_read_only, empty_query, syntax_error), "
                         "fails (query_failed) or needs more than its budget (too_expensive, timeout).",
          "content": ERROR_CONTENT},
    403: {"description": "forbidden: the key lacks the analyst role.", "content": ERROR_CONTENT},
    429: {"description": "too_many_queries: retry shortly.", "content": ERROR_CONTENT},
    503: {"description": "outbox_unavailable, analytics_unavailable, clickhouse_unavailable, "
                         "projections_missing...", "content": ERROR_CONTENT},
}


def build_query_router(
    principal_dependency: Callable[..., Any], *, settings: Settings, gate: QueryGate | None = None,
    on_read_refused: Callable[[Principal, KeelError, str], None] = lambda _caller, _error, _sql: None,
) -> APIRouter:
    """A router serving ``GET /v1/query`` for principals the dependency authenticates.

    ``on_read_refused`` hears of every query refused for reaching outside the caller's
    projections (``READ_REFUSALS``), in a worker thread.
    """
    router = APIRouter()
    slots = gate or QueryGate()

    @router.get("/v1/query", summary="Run a read-only SQL query over your tenant's projections",
                response_model=None, responses=_ANSWERS)
    async def query(
        caller: Annotated[Principal, Depends(principal_dependency)],
        sql: Annotated[str, Query(description="One SELECT statement.", min_length=1, max_length=MAX_SQL_CHARS)],
        format: Annotated[QueryFormat, Query(description="json, csv, arrow (an Arrow IPC stream) or parquet.")
                          ] = QueryFormat.JSON,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Most rows to return.")] = 1000,
        timeout: Annotated[float, Query(ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S,
                                        description="Seconds the query may run.")] = 30.0,
    ) -> Response:
        if ANALYST_ROLE not in caller.roles:
            return _refused(KeelError(f"the key of {caller.actor.id} lacks the {ANALYST_ROLE} role",
                                      code="forbidden"))
        try:
            result = await run_in_threadpool(execute, settings, sql, tenant=caller.tenant_id, limit=limit,
                                             timeout_s=timeout, gate=slots, may_host=False)
        except KeelError as exc:
            if exc.code in READ_REFUSALS:
                await run_in_threadpool(on_read_refused, caller, exc, sql)
            return _refused(exc)
        return await _answer(result, format)

    return router


async def _answer(result: QueryResult, format: QueryFormat) -> Response:
    if format is QueryFormat.CSV:
        return Response(to_csv(result), media_type="text/csv; charset=utf-8")
    if format is QueryFormat.JSON:
        return Response(to_json(result), media_type="application/json")
    from keel.query import columnar  # only Arrow and Parquet answers pay for importing pyarrow

    if format is QueryFormat.ARROW:
        body = await run_in_threadpool(columnar.to_arrow_stream, result)
        return Response(body, media_type=ARROW_MEDIA_TYPE)
    body = await run_in_threadpool(columnar.to_parquet, result)
    return Response(body, media_type=PARQUET_MEDIA_TYPE)


def _refused(exc: KeelError) -> JSONResponse:
    status = _STATUS.get(exc.code, 503 if exc.code.endswith("unavailable") or exc.code.startswith("chdb")
                         else 400)
    return JSONResponse({"error": exc.as_dict()}, status_code=status)
