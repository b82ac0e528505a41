"""``POST /v1/commands``: authenticate, admit, write durably, answer; served as plain ASGI.

Why plain ASGI: FastAPI's routing, dependency and exception layers cost more CPU per
request than admitting and storing the command (measured: about a quarter of a worker's
time). ``SubmitFastPath`` wraps the FastAPI app and answers this one path itself; the
FastAPI route in ``app.py`` gives it its OpenAPI entry and runs the same ``submit``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from anyio import to_thread
from fastapi import FastAPI

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec, uuid_text
from keel.domain.principal import Principal
from keel.errors import KeelError
from keel.gateway.errors import RECORDED, BodyTooLarge, IdempotencyConflict, http_status
from keel.gateway.admission import Admission
from keel.gateway.settings import IngressSettings
from keel.gateway.writer import BatchWriter
from keel.outbox.models import Accepted
from keel.outbox.store import OutboxStore
from keel.gateway.security_log import SecurityLog
from keel.observability import tracing
from keel.security.keys import KeyStore

log = logging.getLogger("keel.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Respond = Callable[[int, bytes], None]
"""Answers a request ``SubmitFastPath.begin`` took: its status and JSON body."""

PATH = "/v1/commands"


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
    admission: Admission = field(init=False)
    security: SecurityLog = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.codec, self.writer, self.settings.processor_dedupe_window_s)
        self.security = SecurityLog(self.settings, self.keys)

    def cached(self, token: str | None) -> Principal | None:
        """The key's principal while the cache holds it fresh; None: ``authenticate`` reads the key store."""
        cached = self.verified.get(token or "")
        return cached[0] if cached is not None and cached[1] > time.monotonic() else None

    async def authenticate(self, token: str | None) -> Principal:
        """The key's principal, from the cache while it is fresh."""
        cached = self.cached(token)
        if cached is not None:
            return cached
        principal = await to_thread.run_sync(self.keys.authenticate, token)
        if len(self.verified) > 10_000:
            self.verified.clear()
        self.verified[token or ""] = (principal, time.monotonic() + self.ingress.gateway_key_cache_s)
        return principal


async def submit(gw: Gateway, headers: dict[bytes, bytes], receive: Receive) -> bytes:
    """Accept one command durably; returns the 202 body. Raises typed ``KeelError``s.

    The same id and body again answer with the original result; the same id with another
    body is a conflict.
    """
    caller = await gw.authenticate(_token(headers))
    try:
        raw = await _body(headers, receive, gw.ingress.gateway_max_body_bytes)
    except KeelError as exc:
        await _refused(gw, caller, exc, b"")
        raise
    return await submit_as(gw, caller, raw)


async def submit_as(gw: Gateway, caller: Principal, raw: bytes) -> bytes:
    """Accept the command ``raw`` from an authenticated ``caller``, as ``submit`` does; the
    approvals routes and the console send their commands through here."""
    # The request's span continues in the envelope: through the outbox to every later hop.
    traceparent = tracing.current_traceparent()
    try:
        result = await gw.admission.admit(raw, caller, traceparent)
        if result.conflict:
            raise _conflict(result)
    except KeelError as exc:
        await _refused(gw, caller, exc, raw)
        raise
    return _accepted(result, caller, raw, traceparent)


def _accepted(result: Accepted, caller: Principal, raw: bytes, traceparent: str | None) -> bytes:
    """The 202 body of a command written durably."""
    command_id = uuid_text(result.command_id)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("command accepted", extra={"tenant_id": caller.tenant_id, "actor": actor_name(caller),
                                            "command_id": command_id, "replayed": result.replayed,
                                            "traceparent": traceparent or _peek(raw, "traceparent")})
    return orjson.dumps({"command_id": command_id, "status": result.status, "replayed": result.replayed,
                         "status_url": f"{PATH}/{command_id}"})


def error_body(exc: KeelError) -> bytes:
    """The JSON body of every refusal: ``{"error": {"code", "field", "message"}}``."""
    return json.dumps({"error": exc.as_dict()}).encode()


def log_unauthenticated(exc: KeelError, path: str, client: str | None) -> None:
    """A refusal with no principal to attribute it to is logged only."""
    if exc.code in {"missing_key", "invalid_key"}:
        log.info("request refused", extra={"code": exc.code, "path": path, "client": client})


class SubmitFastPath:
    """ASGI front of the gateway app: ``POST /v1/commands`` answered here, all else passed on.

    ``begin`` serves the same requests without the ASGI exchange, for the gateway's HTTP
    protocol (``keel.gateway.protocol``), which hands it whole requests.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        # Traced by OpenTelemetry's ASGI middleware when tracing is on (FastAPI's own
        # instrumentation never sees this path); untouched, and as fast, when it is off.
        self.traced = tracing.enabled()
        self._submit: Callable[[Scope, Receive, Send], Awaitable[None]] = (
            tracing.asgi_traced(self._answer, f"POST {PATH}") if self.traced else self._answer)

    def begin(self, headers: dict[bytes, bytes], raw: bytes, respond: Respond) -> bool:
        """Submit the body ``raw`` as ``submit`` does, without a task of its own, when its key is in
        the cache: ``respond(status, body)`` once the command is durable, or refused. False (and
        nothing done) when the key must be read from the key store first, or while tracing:
        the ASGI path serves the request then.
        """
        # ``state["gateway"]``, not ``state.gateway``: Starlette's ``State`` answers attributes from
        # ``__getattr__``, which Python calls only after its own look-up raised (and dropped) an
        # AttributeError: 0.65 µs, against 0.02, twice a request.
        gw: Gateway = self.app.state["gateway"]
        caller = None if self.traced else gw.cached(_token(headers))
        if caller is None:
            return False
        try:
            _check_body(headers, len(raw), gw.ingress.gateway_max_body_bytes)
        except KeelError as exc:
            _refuse(gw, caller, exc, b"", respond)
            return True
        gw.admission.enqueue(raw, caller).add_done_callback(
            lambda written: _settle(gw, caller, raw, written, respond))
        return True

    @property
    def max_body_bytes(self) -> int:
        """The largest body a submit may have."""
        limit: int = self.app.state["gateway"].ingress.gateway_max_body_bytes
        return limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not submits(scope):
            await self.app(scope, receive, send)
            return
        await self._submit(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, body = 202, await submit(self.app.state["gateway"], dict(scope["headers"]), receive)
        except KeelError as exc:
            log_unauthenticated(exc, PATH, scope["client"][0] if scope.get("client") else None)
            status, body = http_status(exc), error_body(exc)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


def submits(scope: Scope) -> bool:
    """Whether the request is a ``POST /v1/commands``, which ``SubmitFastPath`` answers."""
    return bool(scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == PATH)


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer …`` header value."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def actor_name(principal: Principal) -> str:
    """``kind:id`` of the principal's actor, as logs and rejection rows name it."""
    return f"{principal.actor.kind.value}:{principal.actor.id}"


def _token(headers: dict[bytes, bytes]) -> str | None:
    return bearer_token(headers.get(b"authorization", b"").decode("latin-1"))


def _check_body(headers: dict[bytes, bytes], size: int, limit: int) -> None:
    """Refuse a body that is no JSON, or that is (or says it is) longer than ``limit``."""
    kind = headers.get(b"content-type", b"application/json").decode("latin-1")
    if "json" not in kind:
        raise KeelError(f"send application/json, not {kind[:100]}", code="unsupported_media_type",
                        field="header.content-type")
    declared = headers.get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the body has {declared.decode()} bytes; the limit is {limit}", field="")
    if size > limit:
        raise BodyTooLarge(f"the body exceeds the limit of {limit} bytes", field="")


def _settle(gw: Gateway, caller: Principal, raw: bytes, written: asyncio.Future[Accepted], respond: Respond) -> None:
    """Answer ``begin``'s request once its write is done, as ``submit_as`` would."""
    error = written.exception() if not written.cancelled() else KeelError("the write was cancelled",
                                                                          code="internal_error")
    if error is None:
        result = written.result()
        if not result.conflict:
            respond(202, _accepted(result, caller, raw, None))
            return
        error = _conflict(result)
    if isinstance(error, KeelError):
        _refuse(gw, caller, error, raw, respond)
        return
    log.error("submitting a command failed", exc_info=error)
    respond(500, _FAILED)


def _conflict(result: Accepted) -> IdempotencyConflict:
    return IdempotencyConflict(f"command id {result.command_id} was used before with another body", field="id")


_FAILED = error_body(KeelError("the gateway failed; its log says why", code="internal_error"))
"""The answer to a submit that failed for a reason no refusal names (a bug, a lost disk)."""


def _refuse(gw: Gateway, caller: Principal, exc: KeelError, raw: bytes, respond: Respond) -> None:
    """Log (and, when it may attack isolation, keep) the refusal, then answer it: in a task, since
    keeping it writes to the outbox."""

    async def refuse() -> None:
        try:
            await _refused(gw, caller, exc, raw)
        except Exception:  # noqa: BLE001 - as the ASGI path, whose error would reach uvicorn
            log.exception("recording a refusal failed")
            respond(500, _FAILED)
            return
        respond(http_status(exc), error_body(exc))

    _refusals.add(task := asyncio.get_running_loop().create_task(refuse()))
    task.add_done_callback(_refusals.discard)


_refusals: set[asyncio.Task[None]] = set()
"""The refusals being recorded (the loop keeps only weak references to tasks)."""


async def _body(headers: dict[bytes, bytes], receive: Receive, limit: int) -> bytes:
    _check_body(headers, 0, limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise KeelError("the client went away before sending the whole body", code="client_disconnected",
                            field="")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body exceeds the limit of {limit} bytes", field="")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _refused(gw: Gateway, caller: Principal, exc: KeelError, raw: bytes) -> None:
    """Log every refusal; keep the ones that may attack tenant isolation."""
    level = logging.WARNING if exc.code in RECORDED else logging.INFO
    log.log(level, "command refused", extra={"tenant_id": caller.tenant_id, "actor": actor_name(caller),
                                          "code": exc.code, "field": exc.field, "reason": exc.message})
    if exc.code in RECORDED:
        claimed = _peek(raw, "tenant_id")
        await to_thread.run_sync(lambda: gw.store.record_rejection(
            tenant_id=caller.tenant_id, actor=actor_name(caller), code=exc.code, field=exc.field,
            message=exc.message, claimed_tenant=claimed, command_id=_peek(raw, "id")))
        details = {"code": exc.code, "field": exc.field, "claimed_tenant": claimed, "command_id": _peek(raw, "id")}
        # Into the caller's audit chain, and the claimed tenant's; in the background, so a
        # Kafka outage never stalls the gateway (the row above is the durable record).
        asyncio.get_running_loop().run_in_executor(None, gw.security.isolation_violation, caller.tenant_id,
                                                   actor_name(caller), details)


def _peek(raw: bytes, name: str) -> str | None:
    try:
        value = json.loads(raw).get(name)
    except (ValueError, AttributeError, RecursionError):
        return None
    return str(value)[:200] if value is not None else None
