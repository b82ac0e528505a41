"""The HTTP command gateway: authenticated, idempotent, durable acknowledgement of commands.

Stateless: every replica reads keys from and writes commands to the shared outbox
database; the relay alone talks to Kafka. ``create_app`` builds everything at start-up
(FastAPI lifespan), nothing at import time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from anyio import sleep, to_thread
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent

from keel.config import Settings
from keel.bootstrap import edge_codec
from keel.query.http import build_query_router
from keel.trust.store import append_receipt
from keel.contracts.codec import EnvelopeCodec
from keel.domain.principal import Principal
from keel.errors import KeelError, ValidationError
from keel.gateway.errors import RECORDED, BodyTooLarge, IdempotencyConflict, NotFound, http_status
from keel.gateway.intake import admit
from keel.gateway.schemas import AcceptedResponse, ErrorResponse, command_definitions, command_request_schema
from keel.gateway.settings import IngressSettings
from keel.gateway.writer import BatchWriter
from keel.logs import configure_logging
from keel.outbox.db import open_database
from keel.outbox.models import TERMINAL, CommandRecord
from keel.outbox.store import OutboxStore
from keel.security.keys import KeyStore

log = logging.getLogger("keel.gateway")

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in (
        (400, "malformed_json"), (401, "missing_key, invalid_key"), (403, "wrong_tenant, wrong_actor"),
        (409, "idempotency_conflict"), (413, "payload_too_large"), (415, "unsupported_media_type"),
        (422, "unknown_type, unknown_schema, schema_violation, not_a_command"), (503, "outbox_unavailable"))
}


@dataclass
class Gateway:
    """What the routes share: stores, the batching writer, and a short-lived key cache."""

    store: OutboxStore
    keys: KeyStore
    writer: BatchWriter
    ingress: IngressSettings
    settings: Settings
    codec: EnvelopeCodec = field(default_factory=EnvelopeCodec)
    verified: dict[str, tuple[Principal, float]] = field(default_factory=dict)

    async def authenticate(self, token: str | None) -> Principal:
        """The key's principal, from the cache while it is fresh."""
        cached = self.verified.get(token or "")
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        principal = await to_thread.run_sync(self.keys.authenticate, token)
        if len(self.verified) > 10_000:
            self.verified.clear()
        self.verified[token or ""] = (principal, time.monotonic() + self.ingress.gateway_key_cache_s)
        return principal


async def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]  # async: no thread hop


_bearer = HTTPBearer(auto_error=False, description="A key from `keel keys create`.")
Shared = Annotated[Gateway, Depends(_gateway)]


async def _principal(gw: Shared, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                        Depends(_bearer)]) -> Principal:
    return await gw.authenticate(credentials.credentials if credentials else None)


Caller = Annotated[Principal, Depends(_principal)]


async def _record(command_id: uuid.UUID, caller: Caller, gw: Shared) -> CommandRecord:
    found = await to_thread.run_sync(gw.store.get, caller.tenant_id, command_id)
    if found is None:
        raise NotFound(f"no command {command_id} in tenant {caller.tenant_id}", field="path.command_id")
    return found


def create_app(settings: Settings, ingress: IngressSettings) -> FastAPI:
    """The gateway application for these settings."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = open_database(ingress.dsn(settings))
        store = OutboxStore(db)
        await to_thread.run_sync(store.migrate)
        codec, release_codec = edge_codec(settings)  # personal fields are sealed before the outbox
        app.state.gateway = Gateway(store, KeyStore(db), BatchWriter(store, ingress.gateway_batch_max), ingress,
                                    settings, codec)
        yield
        app.state.gateway.writer.close()
        release_codec()

    app = FastAPI(title="Keel command gateway", version="1", lifespan=lifespan,
                  description="Send commands with a per-tenant API key; follow their status; "
                              "query your tenant's projections (role analyst).")
    # Analysts' read-only queries. On embedded chDB the process that owns the data path
    # answers them; with a ClickHouse server any gateway replica can.
    app.include_router(build_query_router(_principal, settings=settings))

    @app.exception_handler(KeelError)
    async def keel_error(request: Request, exc: KeelError) -> JSONResponse:
        if exc.code in {"missing_key", "invalid_key"}:  # no principal to attribute it to: log only
            log.info("request refused", extra={"code": exc.code, "path": request.url.path,
                                               "client": request.client.host if request.client else None})
        return JSONResponse({"error": exc.as_dict()}, status_code=http_status(exc))

    @app.exception_handler(RequestValidationError)
    async def request_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        error = ValidationError(f"{where}: {first.get('msg')}", field=where)
        return JSONResponse({"error": error.as_dict()}, status_code=422)

    @app.post("/v1/commands", status_code=202, response_model=AcceptedResponse, responses=_ERRORS,
              response_class=JSONResponse,
              openapi_extra={"security": [{"HTTPBearer": []}], "requestBody": {"required": True, "content": {
                  "application/json": {"schema": command_request_schema()}}}})
    async def submit(request: Request) -> Response:
        """Accept a command durably; the same id and body again answer with the original result."""
        # The hot path resolves no FastAPI dependencies (they cost more than the rest of it):
        # the key is read here; the docs get the same bearer scheme through openapi_extra.
        gw: Gateway = request.app.state.gateway
        caller = await gw.authenticate(_bearer_token(request))
        raw = b""
        try:
            raw = await _body(request, ingress.gateway_max_body_bytes)
            envelope, row = admit(raw, caller, gw.codec)
            result = await gw.writer.accept(row)
            if result.conflict:
                raise IdempotencyConflict(f"command id {row.command_id} was used before with another body",
                                          field="id")
        except KeelError as exc:
            await _refused(gw, caller, exc, raw)
            raise
        log.debug("command accepted", extra={"tenant_id": caller.tenant_id, "actor": _actor(caller),
                                            "command_id": str(envelope.id), "replayed": result.replayed,
                                            "traceparent": envelope.traceparent})
        accepted = AcceptedResponse(command_id=result.command_id, status=result.status, replayed=result.replayed,
                                    status_url=f"/v1/commands/{result.command_id}")
        # A ready Response skips FastAPI's re-validation of the model: the hot path's biggest cost.
        return Response(accepted.model_dump_json(), status_code=202, media_type="application/json")

    @app.get("/v1/commands/{command_id}", response_model=CommandRecord, responses=_ERRORS)
    async def status(found: Annotated[CommandRecord, Depends(_record)]) -> CommandRecord:
        """The command's status (accepted … executed | rejected | dead_lettered) and its events."""
        return found

    @app.get("/v1/commands/{command_id}/stream", response_class=EventSourceResponse, responses=_ERRORS)
    async def stream(found: Annotated[CommandRecord, Depends(_record)], caller: Caller, gw: Shared,
                     timeout_s: Annotated[float, Query(gt=0, le=600)] = 60.0) -> AsyncIterator[ServerSentEvent]:
        """Server-sent ``status`` events on every change, until a final status or the timeout."""
        deadline, seen, current = time.monotonic() + timeout_s, None, found
        while True:
            shape = (current.status, len(current.events))
            if shape != seen:
                seen = shape
                yield ServerSentEvent(event="status", data=current.model_dump(mode="json"))
            if current.status in TERMINAL or time.monotonic() > deadline:
                return
            await sleep(0.2)
            latest: CommandRecord | None = await to_thread.run_sync(gw.store.get, caller.tenant_id,
                                                                    found.command_id)
            current = latest or current

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # the request body's nested models live in components
            generate().setdefault("components", {}).setdefault("schemas", {}).update(command_definitions())
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def app_from_env() -> FastAPI:
    """The gateway built from ``KEEL_*`` variables (uvicorn's factory for worker processes)."""
    configure_logging(json_lines=True)  # each worker process logs JSON lines, not only the parent
    return create_app(Settings(), IngressSettings())


async def _body(request: Request, limit: int) -> bytes:
    kind = request.headers.get("content-type", "application/json")
    if "json" not in kind:
        raise KeelError(f"send application/json, not {kind[:100]}", code="unsupported_media_type",
                        field="header.content-type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the body has {declared} bytes; the limit is {limit}", field="")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body exceeds the limit of {limit} bytes", field="")
        chunks.append(chunk)
    return b"".join(chunks)


async def _refused(gw: Gateway, caller: Principal, exc: KeelError, raw: bytes) -> None:
    """Log every refusal; keep the ones that may attack tenant isolation."""
    level = logging.WARNING if exc.code in RECORDED else logging.INFO
    log.log(level, "command refused", extra={"tenant_id": caller.tenant_id, "actor": _actor(caller),
                                          "code": exc.code, "field": exc.field, "reason": exc.message})
    if exc.code in RECORDED:
        claimed = _peek(raw, "tenant_id")
        await to_thread.run_sync(lambda: gw.store.record_rejection(
            tenant_id=caller.tenant_id, actor=_actor(caller), code=exc.code, field=exc.field,
            message=exc.message, claimed_tenant=claimed, command_id=_peek(raw, "id")))
        details = {"code": exc.code, "field": exc.field, "claimed_tenant": claimed, "command_id": _peek(raw, "id")}
        # Into the tenant's audit chain too; in the background, so a Kafka outage never
        # stalls the gateway (the row above is the durable record).
        asyncio.get_running_loop().run_in_executor(None, _audit_violation, gw.settings, caller, details)


def _audit_violation(settings: Settings, caller: Principal, details: dict[str, str | None]) -> None:
    try:
        append_receipt(settings, tenant=caller.tenant_id, type="IsolationViolation", actor=_actor(caller),
                       details=details)
    except Exception:  # noqa: BLE001 - logged; the outbox row keeps the violation
        log.exception("could not append an isolation violation to the audit chain",
                      extra={"tenant_id": caller.tenant_id})


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _peek(raw: bytes, name: str) -> str | None:
    try:
        value = json.loads(raw).get(name)
    except (ValueError, AttributeError, RecursionError):
        return None
    return str(value)[:200] if value is not None else None


def _actor(principal: Principal) -> str:
    return f"{principal.actor.kind.value}:{principal.actor.id}"
