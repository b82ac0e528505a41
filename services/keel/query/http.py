"""``GET /v1/query``: the analyst query API, as a router the gateway mounts.

The caller's tenant comes only from their principal (their API key), never from a
parameter: the query runs in that tenant's scope (``keel.query.scope``). Only principals
with the ``analyst`` role may query. Queries run in a worker thread behind a ``QueryGate``,
so a burst of analysts is told to retry (429) rather than piling onto the engine.
"""

# No ``from __future__ import annotations``: FastAPI must see the route's annotations as
# objects, and they name the factory's local ``principal_dependency``.
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from keel.config import Settings
from keel.domain.principal import Principal
from keel.errors import KeelError
from keel.query.render import to_csv, to_json
from keel.query.service import QueryGate, execute

ANALYST_ROLE = "analyst"
MAX_LIMIT = 100_000
MAX_TIMEOUT_S = 60.0

_STATUS = {"forbidden": 403, "too_many_queries": 429, "timeout": 504}
READ_REFUSALS = frozenset({"table_not_allowed", "function_not_allowed", "not_read_only"})
"""Refusals of a query that reaches outside the caller's projections: recorded as security events."""


class QueryFormat(StrEnum):
    """What ``GET /v1/query`` answers with."""

    JSON = "json"
    CSV = "csv"


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

    @router.get("/v1/query", summary="Run a read-only SQL query over your tenant's projections")
    async def query(
        caller: Annotated[Principal, Depends(principal_dependency)],
        sql: Annotated[str, Query(description="One SELECT statement.", max_length=100_000)],
        format: Annotated[QueryFormat, Query(description="json or csv.")] = QueryFormat.JSON,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Most rows to return.")] = 1000,
        timeout: Annotated[float, Query(gt=0, le=MAX_TIMEOUT_S, description="Seconds the query may run.")] = 30.0,
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
        if format is QueryFormat.CSV:
            return Response(to_csv(result), media_type="text/csv; charset=utf-8")
        return Response(to_json(result), media_type="application/json")

    return router


def _refused(exc: KeelError) -> JSONResponse:
    status = _STATUS.get(exc.code, 503 if exc.code.endswith("unavailable") or exc.code.startswith("chdb")
                         else 400)
    return JSONResponse({"error": exc.as_dict()}, status_code=status)
