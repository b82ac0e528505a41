"""Avro single-object encoding of envelopes (``C3 01`` + 8-byte fingerprint + body).

Any consumer resolves the writer schema from the fingerprint in the catalog and reads it
with the current reader schema. A record of an older version of a type with upcasters
takes the path ``keel schemas check`` proves: resolved to the first version an upcaster
starts at, upcast to the next version, and so on up to the newest. Bytes that are not a
Keel message raise typed ``DecodeError``s, which the processor routes to the DLQ with the
reason.

The Avro core: ``keel_avro`` (``native/keel-avro``, built by ``make setup`` when cargo is
there) encodes and decodes records of their type's current schema, the processor's usual
case, byte for byte and value for value as fastavro does, several times faster
(``benchmarks/README.md``). Resolution between schema versions, upcasting, schemas the
native plan does not compile and values it does not write (it defers them to fastavro, which
writes or rejects them as ever) take fastavro. ``KEEL_AVRO=python`` forces fastavro;
``KEEL_AVRO=native`` fails at import when the native core is not installed
(``keel.contracts.native`` loads it). ``AVRO_CORE`` says which one runs. The native core also
builds decoded envelopes (``ENVELOPE_BUILDER``), checking the rules of the envelope models the
Avro types do not hold, where pydantic took 5–7 µs an envelope; a record it cannot confirm goes
to pydantic, which accepts it or names the error.
"""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol, cast

from fastavro import schemaless_reader, schemaless_writer
from pydantic_core import PydanticUndefined

from keel.contracts.catalog import Catalog, MessageSchema, Upcaster, load_catalog
from keel.contracts.native import AVRO_CORE, CORE, uuid_text
from keel.domain.envelope import Actor, ActorKind, Authority, DelegationLink, Envelope
from keel.domain.parsing import Builder, parse_envelope
from keel.errors import DecodeError

__all__ = ["EnvelopeCodec", "parse_envelope", "MAGIC", "AVRO_CORE", "ENVELOPE_BUILDER", "uuid_text"]

MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8

log = logging.getLogger(__name__)


class NativePlan(Protocol):
    """``keel_avro.Plan``: one message schema compiled, its single-object header included."""

    def encode(self, record: Mapping[str, Any]) -> bytes | None:
        """Header and body, or None for a value fastavro must write (or reject)."""

    def decode(self, data: bytes, offset: int) -> dict[str, Any]:
        """The record from byte ``offset`` on; raises ``keel_avro.CorruptData`` (a ValueError)."""


class NativeCore(Protocol):
    """What the codec uses of the ``keel_avro`` module (typed here: it may not be installed)."""

    Plan: Callable[[dict[str, Any], bytes], NativePlan]
    """Compiles a parsed schema with its header; raises ``UnsupportedSchema`` for a feature it lacks."""
    UnsupportedSchema: type[ValueError]
    EnvelopeBuilder: Callable[..., Any]
    """Builds envelopes once given the models, their fields and defaults (``native/keel-avro/src/envelope.rs``)."""
    uuid_text: Callable[[uuid.UUID], str]
    """``str(value)``, formatted natively for a ``uuid.UUID`` (absent from builds before 2026-12-06)."""


_NATIVE: Final = cast(NativeCore | None, CORE)
log.debug("Avro core: %s", AVRO_CORE)

ENVELOPE_MODELS = (Envelope, Actor, DelegationLink, Authority)
NATIVE_ENVELOPE_RULES = "f8ec05d8410e661d"
"""The digest of ``envelope_rules()`` for the models ``native/keel-avro/src/envelope.rs`` implements.
When the models change, check that file against them, then set this to the new digest."""


def envelope_rules() -> str:
    """What the envelope models require of a value: each model's configuration and validators, each
    field's type, constraints and default. The native builder holds only for these."""
    lines = []
    for model in ENVELOPE_MODELS:
        decorators = model.__pydantic_decorators__
        lines.append(f"{model.__name__} {sorted(model.model_config.items())} "
                     f"{sorted(decorators.field_validators)} {sorted(decorators.model_validators)}")
        lines += [f"{model.__name__}.{name}: {info.annotation!r} {info.metadata!r} {info.default!r}"
                  for name, info in model.model_fields.items()]
    return "\n".join(lines)


def _envelope_builder() -> Builder | None:
    """``keel_avro.EnvelopeBuilder.build`` while the models are the ones it implements; else None
    (pydantic builds every envelope), with a warning when the models changed."""
    if _NATIVE is None or not hasattr(_NATIVE, "EnvelopeBuilder"):  # an older build of the core
        return None
    digest = hashlib.sha256(envelope_rules().encode()).hexdigest()[:16]
    if digest != NATIVE_ENVELOPE_RULES:
        log.warning("the envelope models' rules changed (digest %s, the native builder implements %s): "
                    "pydantic builds every decoded envelope", digest, NATIVE_ENVELOPE_RULES)
        return None
    models = [item for model in ENVELOPE_MODELS
              for item in (model, {name: info.default for name, info in model.model_fields.items()})]
    try:
        builder = _NATIVE.EnvelopeBuilder(*models, {kind.value: kind for kind in ActorKind}, PydanticUndefined)
    except TypeError as exc:  # a build of the core older than this code
        log.warning("the native core's envelope builder does not match this code (%s): pydantic builds every "
                    "envelope until `make setup` builds the core again", exc)
        return None
    return cast(Builder, builder.build)


ENVELOPE_BUILDER: Final = _envelope_builder()
"""Builds a decoded envelope natively, or None when the native core is not there (or does not match)."""

_plans: dict[int, tuple[MessageSchema, NativePlan | None]] = {}
"""Plans by ``id`` of their schema (a ``MessageSchema`` holds a dict, so it is unhashable);
each entry keeps its schema alive, so the id cannot be reused. Shared by every codec: a codec
built per request (the gateway's explain route) compiles nothing."""


def native_plan(schema: MessageSchema) -> NativePlan | None:
    """The native plan of ``schema`` (compiled once per schema object), or None when fastavro handles it."""
    entry = _plans.get(id(schema))
    if entry is not None and entry[0] is schema:
        return entry[1]
    plan = None
    if _NATIVE is not None:
        try:
            plan = _NATIVE.Plan(schema.parsed, MAGIC + schema.fingerprint)
        except _NATIVE.UnsupportedSchema as exc:
            log.debug("%s v%d takes fastavro: %s", schema.message_type, schema.payload_version, exc)
    _plans[id(schema)] = (schema, plan)
    return plan


class EnvelopeCodec:
    """Encodes and decodes envelopes against one schema catalog."""

    def __init__(self, catalog: Catalog | None = None) -> None:
        self.catalog = catalog or load_catalog()
        self._current: dict[bytes, tuple[MessageSchema, NativePlan]] = {}
        """Native plans of current schemas by fingerprint: ``read``'s usual case in one look-up."""
        self._writers: dict[tuple[str, int], tuple[MessageSchema, NativePlan | None]] = {}
        """Schemas and plans by type and payload version: ``encode``'s in one look-up."""

    def encode(self, envelope: Envelope) -> bytes:
        """The single-object encoding of ``envelope`` with its type's declared schema version."""
        writer = self._writers.get((envelope.type, envelope.schema_version))
        if writer is None:
            schema = self.catalog.version(envelope.type, envelope.schema_version)  # raises for an unknown one
            writer = self._writers[(envelope.type, envelope.schema_version)] = schema, native_plan(schema)
        schema, plan = writer
        record = to_record(envelope)
        if plan is not None and (data := plan.encode(record)) is not None:
            return data
        buffer = io.BytesIO()
        buffer.write(MAGIC + schema.fingerprint)
        schemaless_writer(buffer, schema.parsed, record)
        return buffer.getvalue()

    def prefetch(self, records: Iterable[bytes | None]) -> None:
        """Get ready to decode ``records`` as a batch: nothing to do here (``SealingCodec`` reads keys)."""

    def prepare(self, envelopes: Iterable[Envelope]) -> None:
        """Get ready to encode ``envelopes`` as a batch: nothing to do here (``SealingCodec`` creates keys)."""

    def decode(self, data: bytes) -> Envelope:
        """The envelope in ``data``; raises ``DecodeError`` or ``ValidationError`` if it is not one."""
        return self.parse(self.read(data))

    def parse(self, record: dict[str, Any]) -> Envelope:
        """The envelope of a record ``read`` returned (validated: raises ``ValidationError``)."""
        return parse_envelope(record, builder=ENVELOPE_BUILDER)

    def read(self, data: bytes) -> dict[str, Any]:
        """The raw (unvalidated) record in ``data``, resolved to its type's current schema."""
        if len(data) < HEADER_SIZE or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object message (bad magic or too short)")
        fingerprint = bytes(data[2:HEADER_SIZE])
        current = self._current.get(fingerprint)
        if current is not None and type(data) is bytes:
            return _read_native(data, *current)
        writer = self.catalog.writer(fingerprint)
        reader = self.catalog.latest(writer.message_type)
        # Written with the current schema (the usual case): nothing to resolve.
        resolve = None
        if reader is not writer:
            upcasters = self.catalog.upcasters.get(writer.message_type)
            if upcasters and any(writer.payload_version <= v < reader.payload_version for v in upcasters):
                return self._upcast(data, writer, reader, upcasters)
            resolve = reader.parsed
        elif type(data) is bytes and (plan := native_plan(writer)) is not None:
            self._current[fingerprint] = (writer, plan)
            return _read_native(data, writer, plan)
        try:
            record = cast(dict[str, Any], schemaless_reader(io.BytesIO(data[HEADER_SIZE:]), writer.parsed, resolve))
        except Exception as exc:  # fastavro raises many kinds on corrupt input
            raise DecodeError(f"corrupt {writer.message_type} body: {exc}") from exc
        record["schema_version"] = reader.payload_version
        return record

    def _upcast(self, data: bytes, writer: MessageSchema, reader: MessageSchema,
                upcasters: Mapping[int, Upcaster]) -> dict[str, Any]:
        """The record in ``data`` brought from ``writer``'s version to ``reader``'s through upcasters.

        Each leg resolves the record with Avro to the first version an upcaster starts at
        (or to the newest); the upcaster then makes the next version's payload. A leg that
        needs resolving after an upcaster re-encodes the mapping with its version's schema.
        """
        message_type, schema = writer.message_type, writer
        body, record = data[HEADER_SIZE:], None
        while True:
            version = schema.payload_version
            stop = min((v for v in upcasters if version <= v < reader.payload_version), default=reader.payload_version)
            target = self.catalog.version(message_type, stop)
            if record is None or target is not schema:
                if record is not None:
                    body = _encode(record, schema, message_type)
                try:
                    record = cast(dict[str, Any], schemaless_reader(
                        io.BytesIO(body), schema.parsed, target.parsed if target is not schema else None))
                except Exception as exc:  # fastavro raises many kinds on corrupt input
                    raise DecodeError(f"corrupt {message_type} v{version} body: {exc}") from exc
            if stop == reader.payload_version:
                record["schema_version"] = stop
                return record
            try:
                record["payload"] = upcasters[stop](record["payload"])
            except Exception as exc:  # a team's function: whatever it raises, say whose and where
                raise DecodeError(f"the upcaster of {message_type} v{stop} failed: {type(exc).__name__}: {exc}",
                                  code="upcast_failed") from exc
            schema = self.catalog.version(message_type, stop + 1)


def _read_native(data: bytes, schema: MessageSchema, plan: NativePlan) -> dict[str, Any]:
    """The record in ``data``, written with ``schema`` (its type's current one), read by ``plan``."""
    try:
        record = plan.decode(data, HEADER_SIZE)
    except ValueError as exc:  # keel_avro.CorruptData
        raise DecodeError(f"corrupt {schema.message_type} body: {exc}") from exc
    record["schema_version"] = schema.payload_version
    return record


def _encode(record: dict[str, Any], schema: MessageSchema, message_type: str) -> bytes:
    """``record`` written with ``schema``: an upcaster's output on its way to a later version."""
    buffer = io.BytesIO()
    try:
        schemaless_writer(buffer, schema.parsed, record)
    except Exception as exc:  # the upcaster's payload does not fit its version
        raise DecodeError(f"an upcaster of {message_type} made no v{schema.payload_version} payload: {exc}",
                          code="upcast_failed") from exc
    return buffer.getvalue()


def to_record(envelope: Envelope) -> dict[str, Any]:
    """The envelope as the plain mapping Avro writes.

    The models are validated when built, so this copies attributes instead of running
    pydantic's serializer (a quarter of the processor's time per command when it did).
    """
    record = dict(envelope.__dict__)
    record["actor"] = envelope.actor.__dict__
    record["authority"] = envelope.authority.__dict__
    record["delegation"] = [{"actor": link.actor.__dict__, "reason": link.reason} for link in envelope.delegation]
    record["payload"] = envelope.payload.__dict__
    return record
