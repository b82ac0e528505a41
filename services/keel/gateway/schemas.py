"""The gateway's HTTP bodies, as pydantic models that feed the OpenAPI document."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.domain.envelope import Envelope
from keel.outbox.models import CommandStatus

FROM_KEY = ("id", "tenant_id", "actor", "correlation_id", "occurred_at")


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


def _envelope_schema() -> dict[str, Any]:
    return Envelope.model_json_schema(ref_template="#/components/schemas/{model}")


def command_definitions() -> dict[str, Any]:
    """The models the request body refers to, for the OpenAPI components."""
    return dict(_envelope_schema().get("$defs", {}))


def command_request_schema() -> dict[str, Any]:
    """The envelope's JSON schema, with the fields the gateway fills from the key made optional."""
    schema = _envelope_schema()
    schema.pop("$defs", None)
    schema["required"] = [name for name in schema.get("required", []) if name not in FROM_KEY]
    schema["description"] = ("A command envelope. tenant_id and actor come from the API key (a body that "
                             "names others is refused); id defaults to a new UUID, send one to be idempotent.")
    return schema
