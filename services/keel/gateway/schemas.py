"""The gateway's HTTP bodies, as pydantic models that feed the OpenAPI document."""

from __future__ import annotations

import operator
import uuid
from datetime import datetime
from functools import cache, reduce
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, TypeAdapter, create_model

from keel.contracts.catalog import load_catalog
from keel.contracts.jsonschema import LongBounded
from keel.domain.envelope import Actor, Envelope
from keel.domain.messages import known_payloads
from keel.domain.personal import is_personal
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


ERROR_CONTENT = {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}
"""Every refusal's content, whatever a route's success is (an event stream, CSV, Arrow...)."""


def error_responses(*codes: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that refuses with ``codes``, one entry per status.

    Each names its content type: with a ``model`` FastAPI would file the error under the
    route's own media type, e.g. ``text/event-stream`` for a stream that refuses in JSON.
    The ``ErrorResponse`` component comes with ``command_bodies``.
    """
    statuses: dict[int, list[str]] = {}
    for code in codes:
        statuses.setdefault(HTTP_STATUS[code], []).append(code)
    return {status: {"description": ", ".join(named), "content": ERROR_CONTENT}
            for status, named in sorted(statuses.items())}


def _request_model() -> type[Envelope]:
    """The envelope as a request body: the fields the gateway fills in are optional.

    ``correlation_id`` and ``occurred_at`` may be left out but not sent as null: the gateway
    fills in only what is absent (``keel.gateway.intake``), so the schema shows no null and no default.
    """
    return create_model(
        "CommandRequest", __base__=Envelope,
        __doc__="A command envelope. tenant_id and actor come from the API key (a body that names others "
                "is refused); id defaults to a new UUID, send one to be idempotent.",
        id=(uuid.UUID | None, None), tenant_id=(str | None, None), actor=(Actor | None, None),
        correlation_id=(uuid.UUID, _omissible("Defaults to the command's id.")),
        occurred_at=(datetime, _omissible("When the command was made; defaults to now. At most "
                                          "KEEL_PROCESSOR_DEDUPE_WINDOW_S ago, else beyond_dedupe_window.")))


def _omissible(description: str) -> Any:
    return Field(default=None, description=description, json_schema_extra=_no_default)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


@cache
def _members(sealing: bool) -> dict[str, type[Envelope]]:
    """One request model per command type: its ``type`` a constant, its ``payload`` the command's model,
    its ``schema_version`` one the catalog has (another is refused ``unknown_schema``).

    ``sealing``: the gateway seals personal values, under a key of their data subject, so a command
    whose payload always holds one (a required personal field) must name it in ``on_behalf_of``
    (else ``personal_data_without_subject``). An optional personal field cannot be told apart in
    JSON Schema (the rule holds only when it has a value): such a command keeps it optional.
    """
    base, catalog = _request_model(), load_catalog()
    members: dict[str, type[Envelope]] = {}
    for name, cls in known_payloads().items():
        if cls.kind != "command":
            continue
        versions = tuple(sorted({schema.payload_version for schema in catalog.by_type.get(name, ())})) or (
            cls.schema_version,)
        constant: Any = Literal[name]
        known: Any = Literal[versions]
        fields: dict[str, Any] = {"type": (constant, ...), "payload": (cls, ...),
                                  "schema_version": (known, versions[-1])}
        model = f"{name}Request"
        if sealing and any(is_personal(field) and field.is_required() for field in cls.model_fields.values()):
            fields["on_behalf_of"] = (str, Field(min_length=1, max_length=200, description=(
                "The data subject of the payload's personal values, sealed under their key.")))
            model = f"{name}WithSubjectRequest"
        members[name] = create_model(model, __base__=base, **fields)
    return members


def command_bodies(*, sealing: bool = False) -> dict[str, Any]:
    """OpenAPI components: ``AnyCommand`` (every command, for ``POST /v1/commands``),
    ``DomainCommand`` (the domains' commands, for ``POST /v1/explain``), ``ErrorResponse``
    (every refusal, see ``error_responses``) and the models they name.

    ``sealing``: whether ``POST /v1/commands`` seals personal values (``keel.bootstrap.edge_codec``);
    ``POST /v1/explain`` never does. Documentation only: the gateway validates bodies with
    ``keel.gateway.intake``, which is faster.
    """
    domains = current().aggregate_of
    components: dict[str, Any] = {}
    for name, members, types in (("AnyCommand", _members(sealing), None), ("DomainCommand", _members(False), domains)):
        chosen = [members[t] for t in members if types is None or t in types]
        union = reduce(operator.or_, chosen)
        body: Any = Annotated[union, Discriminator("type")] if len(chosen) > 1 else union
        schema = TypeAdapter[Any](body).json_schema(ref_template=REF, schema_generator=LongBounded)
        components |= schema.pop("$defs", {})
        components[name] = schema
    errors = TypeAdapter(ErrorResponse).json_schema(ref_template=REF)
    components |= errors.pop("$defs", {})
    components["ErrorResponse"] = errors
    return components


KEYED = ("missing_key", "invalid_key", "outbox_unavailable")
"""The refusals of every keyed route: each looks its key up in the outbox."""
