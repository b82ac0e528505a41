"""The gateway's HTTP bodies, as pydantic models that feed the OpenAPI document."""

from __future__ import annotations

import operator
import uuid
from datetime import datetime
from functools import cache, reduce
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, TypeAdapter, create_model

from keel.domain.envelope import Actor, Envelope
from keel.domain.messages import known_payloads
from keel.domains.registry import current
from keel.gateway.errors import HTTP_STATUS
from keel.outbox.models import CommandStatus

REF = "#/components/schemas/{model}"


class AcceptedResponse(BaseModel):
    """The durable acknowledgement of a command."""

    model_config = ConfigDict(frozen=True)

    command_id: uuid.UUID
    status: CommandStatus
    replayed: bool = Field(description="True when this id and body were accepted before.")
    status_url: str


class ErrorDetail(BaseModel):
    """Why a request was refused."""

    model_config = ConfigDict(frozen=True)

    code: str = Field(description="Machine-readable, e.g. wrong_tenant, schema_violation.")
    field: str | None = Field(description="Path of the offending field, e.g. payload.ttl.")
    message: str


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    model_config = ConfigDict(frozen=True)

    error: ErrorDetail


def error_responses(*codes: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that refuses with ``codes``, one entry per status."""
    statuses: dict[int, list[str]] = {}
    for code in codes:
        statuses.setdefault(HTTP_STATUS[code], []).append(code)
    return {status: {"model": ErrorResponse, "description": ", ".join(named)}
            for status, named in sorted(statuses.items())}


def _request_model() -> type[Envelope]:
    """The envelope as a request body: the fields the gateway fills in are optional."""
    return create_model(
        "CommandRequest", __base__=Envelope,
        __doc__="A command envelope. tenant_id and actor come from the API key (a body that names others "
                "is refused); id defaults to a new UUID, send one to be idempotent.",
        id=(uuid.UUID | None, None), tenant_id=(str | None, None), actor=(Actor | None, None),
        correlation_id=(uuid.UUID | None, None), occurred_at=(datetime | None, None))


@cache
def _members() -> dict[str, type[Envelope]]:
    """One request model per command type: its ``type`` a constant, its ``payload`` the command's model."""
    base = _request_model()
    return {name: create_model(f"{name}Request", __base__=base, type=(Literal[name], ...),  # type: ignore[arg-type]
                               payload=(cls, ...))
            for name, cls in known_payloads().items() if cls.kind == "command"}


def command_bodies() -> dict[str, Any]:
    """OpenAPI components: ``AnyCommand`` (every command, for ``POST /v1/commands``),
    ``DomainCommand`` (the domains' commands, for ``POST /v1/explain``) and the models they name.

    Documentation only: the gateway validates bodies with ``keel.gateway.intake``, which is faster.
    """
    members, domains = _members(), current().aggregate_of
    components: dict[str, Any] = {}
    for name, types in (("AnyCommand", list(members)), ("DomainCommand", [t for t in members if t in domains])):
        union = reduce(operator.or_, [members[t] for t in types])
        body: Any = Annotated[union, Discriminator("type")] if len(types) > 1 else union
        schema = TypeAdapter[Any](body).json_schema(ref_template=REF)
        components |= schema.pop("$defs", {})
        components[name] = schema
    return components


KEYED = ("missing_key", "invalid_key", "outbox_unavailable")
"""The refusals of every keyed route: each looks its key up in the outbox."""
