"""The Avro schemas, the pydantic models and the single-object codec agree."""

from __future__ import annotations

import io
import json
import types
import typing
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer
from fastavro.utils import generate_many
from pydantic import BaseModel

from keel.contracts.catalog import SCHEMA_ROOT, load_catalog
from keel.contracts.codec import MAGIC, EnvelopeCodec, parse_envelope
from keel.domain.envelope import Actor, ActorKind, DelegationLink, Envelope, new_command
from keel.domain.messages import known_payloads
from keel.domains.registry import current

PAYLOADS = known_payloads()
from support_desk.messages import SendEmail, StartSubscription
from keel.errors import DecodeError, UnknownMessageType, UnknownSchema, ValidationError

AVRO_PRIMITIVES: dict[str, set[Any]] = {
    "string": {str}, "long": {int}, "int": {int}, "double": {float}, "boolean": {bool},
    "uuid": {uuid.UUID}, "timestamp-micros": {datetime},
}


def _avro_kind(avro_type: Any) -> str:
    """A field's type name: primitive, logical type, or 'enum'."""
    if isinstance(avro_type, dict):
        return str(avro_type.get("logicalType") or avro_type["type"])
    return str(avro_type)


def _avro_fields(schema: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
    """Field name -> (non-null type, nullable)."""
    fields = {}
    for field in schema["fields"]:
        kind = field["type"]
        nullable = isinstance(kind, list) and "null" in kind
        if isinstance(kind, list):
            [kind] = [k for k in kind if k != "null"]
        fields[field["name"]] = (kind, nullable)
    return fields


def _model_fields(model: type[BaseModel]) -> dict[str, tuple[Any, bool]]:
    fields = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        args = typing.get_args(annotation)
        nullable = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
        if nullable:
            [annotation] = [a for a in args if a is not type(None)]
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        fields[name] = (annotation, nullable)
    return fields


@pytest.mark.parametrize("message_type", sorted(PAYLOADS))
def test_each_payload_model_matches_its_newest_avro_schema(message_type: str) -> None:
    model = PAYLOADS[message_type]
    owner = current().domain_of.get(message_type)
    folder = (owner.schemas if owner else SCHEMA_ROOT) / f"{model.kind}s" / message_type
    newest = sorted(folder.glob("v*.avsc"), key=lambda p: int(p.stem[1:]))[-1]
    avro = _avro_fields(json.loads(newest.read_text()))
    pydantic_fields = _model_fields(model)
    assert avro.keys() == pydantic_fields.keys()
    for name, (avro_type, avro_nullable) in avro.items():
        py_type, py_nullable = pydantic_fields[name]
        assert avro_nullable == py_nullable, name
        kind = _avro_kind(avro_type)
        if kind == "enum":
            assert issubclass(py_type, StrEnum), name
            assert [m.value for m in py_type] == avro_type["symbols"], name
        else:
            assert py_type in AVRO_PRIMITIVES[kind], (name, avro_type, py_type)
    assert int(newest.stem[1:]) == model.schema_version


def test_envelope_model_has_exactly_the_avro_envelope_fields() -> None:
    envelope = json.loads((SCHEMA_ROOT / "envelope" / "v1.avsc").read_text())
    avro = _avro_fields(envelope)
    model = _model_fields(Envelope)
    assert avro.keys() == model.keys()
    assert {n for n, (_, nullable) in avro.items() if nullable} == {
        n for n, (_, nullable) in model.items() if nullable}


def test_every_message_type_has_a_schema_and_vice_versa() -> None:
    assert set(load_catalog().by_type) == set(PAYLOADS)


def _command() -> Envelope:
    return new_command(
        SendEmail(to_address="ada@example.com", template="bye", body="Dear Ada"),
        tenant_id="acme", aggregate_id="sub-1", actor=Actor(kind=ActorKind.AGENT, id="bot"),
        on_behalf_of="cust-ada",
        delegation=(DelegationLink(actor=Actor(kind=ActorKind.HUMAN, id="jane"), reason="asked"),),
        occurred_at=datetime(2026, 11, 22, 12, 30, 1, 123456, tzinfo=UTC),
    )


def test_codec_round_trips_with_single_object_header() -> None:
    codec = EnvelopeCodec()
    command = _command()
    data = codec.encode(command)
    assert data[:2] == MAGIC
    assert data[2:10] == codec.catalog.latest("SendEmail").fingerprint
    assert codec.decode(data) == command


@pytest.mark.parametrize(("data", "error"), [
    (b"", DecodeError),
    (b"{\"json\": true}", DecodeError),
    (MAGIC + b"\x00" * 8 + b"body", UnknownSchema),
])
def test_undecodable_bytes_raise_typed_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        EnvelopeCodec().decode(data)


def test_truncated_body_is_a_decode_error() -> None:
    data = EnvelopeCodec().encode(_command())
    with pytest.raises(DecodeError) as caught:
        EnvelopeCodec().decode(data[:-20])
    assert caught.value.code == "undecodable"


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: d["payload"].update(to_address="not-an-address"), "payload.to_address"),
    (lambda d: d["payload"].pop("template"), "payload.template"),
    (lambda d: d.update(tenant_id="bad tenant/id"), "tenant_id"),
    (lambda d: d["actor"].update(kind="robot"), "actor.kind"),
    (lambda d: d.pop("correlation_id"), "correlation_id"),
    (lambda d: d.update(occurred_at="2026-11-22T12:00:00"), "occurred_at"),
    (lambda d: d["payload"].update(unexpected=1), "payload.unexpected"),
])
def test_a_command_that_breaks_its_schema_names_the_field(mutate: Any, field: str) -> None:
    data = _command().model_dump()
    data["payload"] = dict(data["payload"])
    data["actor"] = dict(data["actor"])
    mutate(data)
    with pytest.raises(ValidationError) as caught:
        parse_envelope(data)
    assert caught.value.field == field
    assert caught.value.code == "schema_violation"
    assert field in str(caught.value)


def test_unknown_command_type_is_rejected_naming_the_type_field() -> None:
    data = _command().model_dump() | {"type": "LaunchMissiles"}
    with pytest.raises(UnknownMessageType) as caught:
        parse_envelope(data)
    assert caught.value.field == "type"


def test_payload_of_another_type_is_rejected() -> None:
    start = StartSubscription(customer_id="c", plan="p", monthly_price_cents=1, currency="EUR")
    with pytest.raises(ValidationError):
        parse_envelope(_command().model_dump() | {"payload": start})


@pytest.mark.parametrize("message_type", sorted(PAYLOADS))
def test_every_released_schema_version_is_readable_by_the_current_reader(message_type: str) -> None:
    """Avro resolution of a generated record from each writer schema into the newest reader."""
    catalog = load_catalog()
    reader = catalog.latest(message_type)
    for writer in catalog.by_type[message_type]:
        for record in generate_many(writer.parsed, 5):
            buffer = io.BytesIO()
            schemaless_writer(buffer, writer.parsed, record)
            buffer.seek(0)
            resolved = schemaless_reader(buffer, writer.parsed, reader.parsed)
            assert isinstance(resolved, dict) and resolved["type"] == record["type"]
