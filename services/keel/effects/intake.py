"""Which records of the events topic an effect worker must look into, told by their headers.

Decoding an event costs far more than reading its headers, and most events carry no effect,
so a worker decodes only the records that matter to it: effect triggers (a type with a local
handler, or the ``keel-effect`` header the processor sets when its registry has an effect),
outcome events (an effect whose outcome is already recorded is not run again), retries,
and compensating events (which cancel the effects of the commands they undo).

A trigger this worker has no handler for is not decoded at all: its type may be unknown
here (the worker lacks the domain's package). ``EnvelopeShell`` reads the envelope fields
of such a record, all but the payload, which is enough to report the effect as waiting.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Mapping
from enum import Flag, auto
from typing import Any, cast

from fastavro import schemaless_reader

from keel.contracts.codec import HEADER_SIZE, MAGIC, EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.domain.events import EffectCancelled, EffectFailed, EffectRetried, EffectSucceeded
from keel.domains.registry import Registry
from keel.errors import DecodeError
from keel.processor.worker import EFFECT_HEADER, TYPE_HEADER

OUTCOME_TYPES = frozenset(t.__name__ for t in (EffectSucceeded, EffectFailed, EffectCancelled))
RETRIED_TYPE = EffectRetried.__name__

Headers = Mapping[str, bytes | None]


class Interest(Flag):
    """What a record is to an effect worker (a compensating event may also trigger an effect)."""

    NONE = 0
    TRIGGER = auto()
    OUTCOME = auto()
    RETRY = auto()
    COMPENSATION = auto()


def interest(headers: Headers, registry: Registry) -> Interest:
    """What the record with ``headers`` is to a worker with ``registry``."""
    raw = headers.get(TYPE_HEADER)
    event_type = raw.decode() if raw else ""
    found = Interest.NONE
    if event_type in registry.effect_of or headers.get(EFFECT_HEADER):
        found |= Interest.TRIGGER
    if event_type in OUTCOME_TYPES:
        found |= Interest.OUTCOME
    elif event_type == RETRIED_TYPE:
        found |= Interest.RETRY
    if event_type in registry.undone_field:
        found |= Interest.COMPENSATION
    return found


def header_text(headers: Headers, name: str) -> str | None:
    value = headers.get(name)
    return value.decode() if value else None


def undone_command(event: Envelope, field: str) -> uuid.UUID | None:
    """The id of the command a compensating ``event`` undoes, from its payload ``field``."""
    value = getattr(event.payload, field, None)
    if value is None or isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


class EnvelopeShell:
    """Reads a record's envelope fields without its payload.

    The payload is the envelope's last field, so Avro reads the fields before it with the
    envelope schema alone (the newest one, composed into every message schema). Records
    written with an older envelope version would misread; there is one version so far.
    """

    def __init__(self, codec: EnvelopeCodec) -> None:
        composed = codec.catalog.latest(RETRIED_TYPE).parsed  # any message's: each carries the envelope
        self._schema = {**{k: v for k, v in composed.items() if k != "__fastavro_parsed"},
                        "name": "keel.EnvelopeShell",
                        "fields": [f for f in composed["fields"] if f["name"] != "payload"]}

    def read(self, data: bytes) -> dict[str, Any]:
        """The envelope fields of ``data`` (``id``, ``tenant_id``, ``aggregate_id``, ``causation_id``...)."""
        if len(data) < HEADER_SIZE or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object message (bad magic or too short)")
        try:
            return cast(dict[str, Any], schemaless_reader(io.BytesIO(data[HEADER_SIZE:]), self._schema, None))
        except Exception as exc:  # fastavro raises many kinds on corrupt input
            raise DecodeError(f"corrupt envelope: {exc}") from exc
