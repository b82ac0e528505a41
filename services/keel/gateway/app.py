"""The HTTP command gateway: authenticated, idempotent, durable acknowledgement of commands.

Stateless: every replica reads keys from and writes commands to the shared outbox
database; the relay alone sends commands to Kafka. Each replica reads one topic, the
compacted controls topic (to its end, then following it): ``/v1/actions`` and
``/v1/explain`` must answer under each tenant's current policy and switches, the ones the
processor decides under. It is read in the background, so a gateway starts and accepts
commands into the outbox while the broker is away; until the topic is read to its end
those two routes answer 503 ``controls_unavailable``. ``create_app`` builds everything at start-up (FastAPI lifespan),
nothing at import time.

A command's record shows its events' personal values as ``keel.trust.reveal`` says: ``⟨sealed⟩``
or ``⟨erased⟩``; in plaintext to a key with the ``personal_data`` role, once that read is
recorded in the tenant's audit chain (if it cannot be, the answer shows no plaintext).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from anyio import sleep, to_thread
from confluent_kafka import KafkaException
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException

from keel.bootstrap import edge_codec, trust_settings
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.governance.controls import Controls
from keel.domain.principal import Principal
from keel.errors import KeelError, ValidationError
from keel.gateway.actions import ActionList, Explanation, allowed_actions, catalog, explain
from keel.gateway.approvals import approvals_router
from keel.gateway.console import console_router
from keel.gateway.errors import BodyTooLarge, ControlsUnavailable, NotFound, framework_error, http_status
from keel.gateway.history import history_router
from keel.gateway.intake import admit
from keel.gateway.reading import read_as
from keel.gateway.schemas import KEYED, AcceptedResponse, command_bodies, error_responses
from keel.gateway.settings import IngressSettings
from keel.gateway.submit import PATH, Gateway, SubmitFastPath, actor_name, log_unauthenticated, submit
from keel.gateway.writer import BatchWriter
from keel.logs import configure_logging
from keel.observability import tracing
from keel.observability.http import Metered, add_metrics_route, start_worker_exporter
from keel.outbox.db import open_database
from keel.outbox.models import CommandRecord
from keel.outbox.store import OutboxStore
from keel.processor.controls import ControlsFollower
from keel.query.http import build_query_router
from keel.security.keys import KeyStore
from keel.supervision import collector, readiness
from keel.trust.reveal import Reader, holds_sealed

log = logging.getLogger("keel.gateway")
CONTROLS_READ_S = 5.0
"""How long one attempt to read the controls topic to its end may take before it is tried again."""

_BODY = ("malformed_json", "wrong_tenant", "wrong_actor", "payload_too_large", "unknown_type", "unknown_schema",
         "schema_violation", "not_a_command", "beyond_dedupe_window", "personal_data_without_subject")
_READ = error_responses(*KEYED, "not_found", "schema_violation")


def _body_schema(component: str) -> dict[str, Any]:
    return {"security": [{"HTTPBearer": []}], "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}}}}


async def _gateway(request: Request) -> Gateway:
    return request.app.state["gateway"]  # type: ignore[no-any-return]  # async: no thread hop


_bearer = HTTPBearer(auto_error=False, description="A key from `keel keys create`.")
Shared = Annotated[Gateway, Depends(_gateway)]


async def _controls(request: Request) -> Controls:
    if not request.app.state.controls_read.is_set():
        raise ControlsUnavailable("the gateway has not read the controls topic to its end yet (is the broker up?); "
                                  "try again shortly")
    return request.app.state.controls  # type: ignore[no-any-return]


def _read_controls(follower: ControlsFollower, read: threading.Event, stopping: threading.Event) -> None:
    """Read the controls topic to its end (trying again while the broker is away), then let the follower follow."""
    while not stopping.is_set():
        try:
            follower.start(timeout_s=CONTROLS_READ_S)
        except (KeelError, KafkaException) as exc:
            log.warning("cannot read the controls topic yet: %s", exc)
            stopping.wait(1.0)
            continue
        read.set()
        return


async def _principal(gw: Shared, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                        Depends(_bearer)]) -> Principal:
    return await gw.authenticate(credentials.credentials if credentials else None)


Caller = Annotated[Principal, Depends(_principal)]
Current = Annotated[Controls, Depends(_controls)]


async def _record(command_id: uuid.UUID, caller: Caller, gw: Shared) -> CommandRecord:
    found = await to_thread.run_sync(gw.store.get, caller.tenant_id, command_id)
    if found is None:
        raise NotFound(f"no command {command_id} in tenant {caller.tenant_id}", field="path.command_id")
    return found


async def _as_read(found: CommandRecord, caller: Principal, gw: Gateway) -> CommandRecord:
    """``found`` as ``caller`` may read it; most records hold nothing sealed and are answered as they are."""
    if not holds_sealed(found.reason) and not any(holds_sealed(event.payload) for event in found.events):
        return found
    return await to_thread.run_sync(_read_by, found, caller, gw)  # the key store and Kafka block


def _read_by(found: CommandRecord, caller: Principal, gw: Gateway) -> CommandRecord:
    return read_as(gw, caller, lambda reader: _shown(found, reader), via=f"GET {PATH}/{found.command_id}")


def _shown(found: CommandRecord, reader: Reader) -> CommandRecord:
    """The record as ``reader`` sees it. Tracked events do not keep their subject: each value
    opens with the subject of its key."""
    events = tuple(event.model_copy(update={"payload": reader.payload(
        event.payload, message_type=event.type, tenant=found.tenant_id, subject=None, entry_id=str(event.event_id),
        command_id=str(found.command_id))}) for event in found.events)
    return found.model_copy(update={"events": events, "reason": reader.masked(found.reason)})


def create_app(settings: Settings, ingress: IngressSettings) -> Metered:
    """The gateway application for these settings: FastAPI behind the command fast path, every request
    counted and timed (``GET /metrics``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = open_database(ingress.dsn(settings))
        store = OutboxStore(db)
        await to_thread.run_sync(store.migrate)
        codec, release_codec = edge_codec(settings)  # personal fields are sealed before the outbox
        app.state.gateway = Gateway(store, KeyStore(db), BatchWriter(store, ingress.gateway_batch_max), ingress,
                                    settings, codec)
        follower, stopping = ControlsFollower(settings, app.state.controls), threading.Event()
        reader = threading.Thread(target=_read_controls, args=(follower, app.state.controls_read, stopping),
                                  name="controls-start", daemon=True)
        reader.start()
        app.state.readiness = readiness.install(readiness.Readiness({  # /readyz: what a command needs
            "outbox": readiness.outbox(db), "broker": readiness.broker(settings.bootstrap_servers,
                                                                       readiness.outbox_backlog(db)),
            "controls": readiness.flag(app.state.controls_read, "the controls topic is not read to its end yet")}))
        catalog()  # the domains' command schemas, built once before the first GET /v1/actions
        collector.settle()  # start-up objects live as long as the process; requests' garbage is young
        yield
        app.state.readiness.stop()
        stopping.set()
        reader.join(timeout=CONTROLS_READ_S + 5)
        follower.close()
        app.state.gateway.admission.close()
        app.state.gateway.writer.close()
        release_codec()

    app = FastAPI(title="Keel command gateway", version="1", lifespan=lifespan,
                  description="Send commands with a per-tenant API key; ask first what you may send and "
                              "what governance would say; follow their status; query your tenant's "
                              "projections (role analyst).")
    app.state.controls, app.state.controls_read = Controls(), threading.Event()
    # Analysts' read-only queries. On embedded chDB the process that owns the data path
    # answers them; with a ClickHouse server any gateway replica can.
    app.include_router(build_query_router(_principal, settings=settings, on_read_refused=lambda caller, exc, sql: (
        app.state.gateway.security.read_refused(caller.tenant_id, actor_name(caller), exc, sql))))
    app.include_router(approvals_router(_principal))  # approvers' list and decisions
    app.include_router(history_router(_principal))  # timelines, trails, audit status, undo
    app.include_router(console_router())  # the web console at /console (docs/console.md)

    @app.exception_handler(KeelError)
    async def keel_error(request: Request, exc: KeelError) -> JSONResponse:
        log_unauthenticated(exc, request.url.path, request.client.host if request.client else None)
        return JSONResponse({"error": exc.as_dict()}, status_code=http_status(exc))

    @app.exception_handler(RequestValidationError)
    async def request_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        error = ValidationError(f"{where}: {first.get('msg')}", field=where)
        return JSONResponse({"error": error.as_dict()}, status_code=422)

    @app.exception_handler(HTTPException)
    async def framework_refusal(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": framework_error(exc.status_code, exc.detail).as_dict()},
                            status_code=exc.status_code, headers=exc.headers)

    @app.post("/v1/commands", status_code=202, response_model=AcceptedResponse, response_class=JSONResponse,
              responses=error_responses(*KEYED, *_BODY, "client_disconnected", "idempotency_conflict",
                                        "unsupported_media_type"),
              openapi_extra=_body_schema("AnyCommand"))
    async def submit_route(request: Request) -> Response:
        """Accept a command durably; the same id and body again answer with the original result."""
        # SubmitFastPath answers this path before FastAPI sees it; the route gives it its
        # OpenAPI entry, and serves it the same way if the FastAPI app is mounted bare.
        body = await submit(request.app.state["gateway"], dict(request.headers.raw), request.receive)
        return Response(body, status_code=202, media_type="application/json")

    @app.get("/v1/commands/{command_id}", response_model=CommandRecord, responses=_READ)
    async def status(found: Annotated[CommandRecord, Depends(_record)], caller: Caller, gw: Shared) -> CommandRecord:
        """The command's status (accepted … executed | rejected | dead_lettered), its events, its
        effects and, in ``summary``, what the agent waits on (an approval, then the effects).

        Personal values read ⟨sealed⟩ (⟨erased⟩ once erased); a key with the personal_data role
        reads them in plaintext, and each such read is recorded in the tenant's audit chain.
        """
        return await _as_read(found, caller, gw)

    @app.get("/v1/commands/{command_id}/stream", response_class=EventSourceResponse, responses=_READ)
    async def stream(found: Annotated[CommandRecord, Depends(_record)], caller: Caller, gw: Shared,
                     timeout_s: Annotated[float, Query(gt=0, le=600)] = 60.0) -> AsyncIterator[ServerSentEvent]:
        """Server-sent ``status`` events on every change of status, events or effects, until the
        command is final and each of its effects settled (``summary.done``), or the timeout."""
        deadline, seen, current = time.monotonic() + timeout_s, None, found
        while True:
            if current != seen:
                seen = current
                shown = await _as_read(current, caller, gw)
                yield ServerSentEvent(event="status", data=shown.model_dump(mode="json"))
            if current.summary.done or time.monotonic() > deadline:
                return
            await sleep(0.2)
            latest: CommandRecord | None = await to_thread.run_sync(gw.store.get, caller.tenant_id,
                                                                    found.command_id)
            current = latest or current

    @app.get("/v1/actions", response_model=ActionList, responses=error_responses(*KEYED, "controls_unavailable"))
    async def actions(caller: Caller, controls: Current) -> ActionList:
        """The domains' command types this key's actor may send under its tenant's current policy
        (its roles and grants), each with its payload's JSON schema."""
        return ActionList(actions=allowed_actions(controls.of(caller.tenant_id).policy, caller.actor))

    @app.post("/v1/explain", response_model=Explanation, openapi_extra=_body_schema("DomainCommand"),
              responses=error_responses(*KEYED, *_BODY, "not_explainable", "controls_unavailable"))
    async def explain_route(request: Request, caller: Caller, controls: Current) -> Explanation:
        """What governance would decide for this ``POST /v1/commands`` body now: refused by a
        guardrail (role, kill switch, agent breaker) or the policy rule's allow, confirm,
        approve or deny. A dry run: nothing is written, no rate limit is spent."""
        raw = await request.body()
        if len(raw) > ingress.gateway_max_body_bytes:
            raise BodyTooLarge(f"the body exceeds the limit of {ingress.gateway_max_body_bytes} bytes", field="")
        # submit's checks, with a plain codec: the edge codec seals personal values, which can write keys
        command, _ = admit(raw, caller, EnvelopeCodec(), max_age_s=settings.processor_dedupe_window_s)
        return explain(command, controls.of(caller.tenant_id), datetime.now(UTC))

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # the request bodies and their nested models live in components
            sealing = trust_settings(settings).master_key_file is not None  # as edge_codec decides
            generate().setdefault("components", {}).setdefault("schemas", {}).update(command_bodies(sealing=sealing))
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """503 with the reasons while the outbox, the broker or the controls are away (checked in the background)."""
        installed: readiness.Readiness | None = getattr(request.app.state, "readiness", None)
        verdict = readiness.NOT_CHECKED if installed is None else installed.verdict()
        return JSONResponse(verdict.as_dict(), status_code=200 if verdict.ready else 503)

    tracing.instrument_fastapi(app)  # every other route's spans (POST /v1/commands: SubmitFastPath)
    add_metrics_route(app)
    return Metered(SubmitFastPath(app))  # FastAPI's middleware never sees the fast path: count around it


def app_from_env() -> Metered:
    """The gateway built from ``KEEL_*`` variables (uvicorn's factory for worker processes)."""
    configure_logging(json_lines=True)  # each worker process logs JSON lines, not only the parent
    tracing.configure_tracing("gateway")  # each worker exports its own spans (off unless OTEL_* say so)
    settings = Settings()
    start_worker_exporter(settings)  # this worker's own scrape target: workers share the gateway's port
    return create_app(settings, IngressSettings())
