"""The bytes of a processor snapshot: typed JSON for aggregates, packed ids, a fingerprint on every record.

The snapshots topic is data, not code, so nothing here is pickle: an aggregate's domain
state goes through a pydantic ``TypeAdapter`` of its registered state type (a dataclass or
a pydantic model), Keel's own parts (parked commands, effects) through models of their
own, and a parked command in its wire form (the envelope codec's Avro, sealed like the
event that parked it, so erasure still reaches it).

Every record starts with a header: magic, format, the registry's fingerprint, the
snapshot's generation and a CRC-32 of the payload. The fingerprint hashes Keel's format
and fold code, each aggregate's state schema and its domain's source files: a snapshot
written by other domain code or another state shape reads as unreadable, never as state.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import struct
import zlib
from array import array
from dataclasses import dataclass, is_dataclass
from datetime import datetime
from functools import cached_property
from types import ModuleType
import typing
from typing import Annotated, Any, Generic, TypeVar
from uuid import UUID

import pydantic
from pydantic import BaseModel, ConfigDict

from keel.contracts.codec import EnvelopeCodec
from keel.domain import aggregate as aggregate_module
from keel.domain import effects as effects_module
from keel.domain.aggregate import AggregateState
from keel.domain.effects import EffectMark
from keel.domain.events import ApprovalKind
from keel.domain.governance import approvals as approvals_module
from keel.domain.governance.approvals import Parked
from keel.domain.personal import Personal
from keel.domains.model import Aggregate
from keel.domains.registry import Registry
from keel.errors import KeelError
from keel.processor.state import ID_SIZE, minutes_array, packed_minutes

FORMAT = 1
"""Bump when the layout below or Keel's own fold (``keel.domain.aggregate``) changes meaning."""
MAGIC = b"KS"
_HEADER = struct.Struct(">2sB8s8sIH")  # magic, format, fingerprint, generation, crc32 of the payload, parts
HEADER_SIZE = _HEADER.size
GENERATION_AT = 11
"""Where a first record's header holds its generation (after magic, format and fingerprint)."""
_PART_HEADER = struct.Struct(">2s8s")  # magic, generation: a further part of a long payload
PART_SIZE = 512 * 1024
"""The largest payload piece in one record: well under Kafka's 1 MB default record limit."""
IDS_PER_RECORD = 24 * 1024
"""Decided ids per record: 20 bytes each (id and minute), about 480 KB."""
_ID_COUNT = struct.Struct(">I")

S = TypeVar("S")


class SnapshotError(KeelError):
    """A snapshot cannot be read (corrupt, truncated, other schema), or an aggregate's state cannot be
    snapshotted: the partition is folded in full."""

    code = "snapshot_unreadable"


class _Parked(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    command: bytes
    kind: ApprovalKind
    policy_rule: str
    policy_version: str
    expires_at: datetime


class _Aggregate(BaseModel, Generic[S]):
    """One aggregate's snapshot; ``S`` is its registered state type."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    version: int
    domain: S
    pending: list[_Parked] = []
    effects: dict[UUID, EffectMark] = {}


class Manifest(BaseModel):
    """What one checkpoint of a partition covers; written last in its transaction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    covered: int
    """The events offset the checkpoint's state runs up to: a load folds the events from it on."""
    aggregates: int
    """How many aggregate records the snapshot holds (a missing one makes it unreadable)."""
    ids: int
    """How many decided ids its live id records hold."""
    id_records: int
    next_seq: int
    """The sequence number of the partition's next id record."""
    window_s: float
    """The dedupe window it kept ids for (a load with a longer one needs the full fold)."""


@dataclass(frozen=True)
class Header:
    """The fixed start of a snapshot record."""

    fingerprint: bytes
    generation: bytes
    crc: int
    parts: int


class SnapshotFormat:
    """Encodes and decodes snapshot records for one registry and codec."""

    def __init__(self, registry: Registry, codec: EnvelopeCodec) -> None:
        self.codec = codec
        self._aggregates = {a.name: a for d in registry.domains for a in d.aggregates}
        self._registry = registry

    @cached_property
    def _models(self) -> dict[str | None, type[_Aggregate[Any]]]:
        return _state_models(self._aggregates)

    @cached_property
    def fingerprint(self) -> bytes:
        """8 bytes naming the format, Keel's fold code, every state schema and every domain's code."""
        digest = hashlib.sha256(f"keel-snapshot/{FORMAT}".encode())
        for module in (aggregate_module, effects_module, approvals_module):
            digest.update(_source(module))
        for name, model in sorted(self._models.items(), key=lambda item: item[0] or ""):
            digest.update(json.dumps([name, model.model_json_schema()], sort_keys=True).encode())
        for domain in sorted(self._registry.domains, key=lambda d: d.name):
            digest.update(domain.name.encode())
            for path in sorted(domain.home.rglob("*.py")):
                digest.update(str(path.relative_to(domain.home)).encode() + path.read_bytes())
        digest.update(json.dumps(sorted(self._registry.effect_of)).encode())
        return digest.digest()[:8]

    # -- records ------------------------------------------------------------------------

    def records(self, key: bytes, payload: bytes, generation: bytes) -> list[tuple[bytes, bytes]]:
        """``(key, value)`` records of ``payload``: one, or parts keyed ``key#1``... when it is long."""
        pieces = [payload[at:at + PART_SIZE] for at in range(0, len(payload), PART_SIZE)] or [b""]
        head = _HEADER.pack(MAGIC, FORMAT, self.fingerprint, generation, zlib.crc32(payload), len(pieces))
        out = [(key, head + pieces[0])]
        out += [(part_key(key, index), _PART_HEADER.pack(MAGIC, generation) + piece)
                for index, piece in enumerate(pieces[1:], start=1)]
        return out

    def header(self, value: bytes) -> Header:
        """The header of a first record; raises ``SnapshotError`` when it is not this format's."""
        if len(value) < HEADER_SIZE:
            raise SnapshotError("a snapshot record is truncated")
        magic, version, fingerprint, generation, crc, parts = _HEADER.unpack_from(value)
        if magic != MAGIC or version != FORMAT:
            raise SnapshotError(f"a snapshot record is not of format {FORMAT}")
        if fingerprint != self.fingerprint:
            raise SnapshotError("the snapshot was written by other domain code or state schemas")
        return Header(fingerprint, generation, crc, parts)

    def payload(self, key: bytes, latest: dict[bytes, bytes | None]) -> tuple[Header, bytes]:
        """The header and checked payload of the record at ``key`` (and its parts) in ``latest``."""
        value = latest.get(key)
        if value is None:
            raise SnapshotError(f"snapshot record {key!r} is missing")
        head = self.header(value)
        pieces = [value[HEADER_SIZE:]]
        for index in range(1, head.parts):
            part = latest.get(part_key(key, index))
            if part is None or part[:_PART_HEADER.size] != _PART_HEADER.pack(MAGIC, head.generation):
                raise SnapshotError(f"part {index} of snapshot record {key!r} is missing")
            pieces.append(part[_PART_HEADER.size:])
        payload = b"".join(pieces)
        if zlib.crc32(payload) != head.crc:
            raise SnapshotError(f"snapshot record {key!r} is corrupt (checksum mismatch)")
        return head, payload

    # -- payloads -----------------------------------------------------------------------

    def encode_aggregate(self, state: AggregateState) -> bytes:
        """An aggregate's payload: its type's name, then its typed JSON."""
        name = (state.aggregate or "").encode()
        pending = [_Parked(command=self.codec.encode(p.command), kind=p.kind, policy_rule=p.policy_rule,
                           policy_version=p.policy_version, expires_at=p.expires_at) for p in state.pending.values()]
        record = self._models[state.aggregate].model_construct(
            version=state.version, domain=state.domain, pending=pending, effects=state.effects)
        return bytes([len(name)]) + name + record.model_dump_json().encode()

    def decode_aggregate(self, payload: bytes) -> AggregateState:
        """The aggregate state in ``payload``; raises ``SnapshotError`` when it does not validate."""
        try:
            size = payload[0]
            name = payload[1:1 + size].decode() or None
            model = self._models.get(name)
            if model is None:
                raise SnapshotError(f"the snapshot names an unregistered aggregate type {name!r}")
            record = model.model_validate_json(payload[1 + size:])
            pending = {}
            for parked in record.pending:
                command = self.codec.decode(parked.command)
                pending[command.id] = Parked(command, parked.kind, parked.policy_rule, parked.policy_version,
                                             parked.expires_at)
        except (IndexError, UnicodeDecodeError, pydantic.ValidationError, KeelError) as exc:
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"an aggregate snapshot does not validate: {exc}") from exc
        return AggregateState(record.version, name, record.domain, pending, record.effects)

    @staticmethod
    def encode_ids(ids: bytes, minutes: array[int]) -> bytes:
        """An id record's payload: the count, the packed ids, their minutes."""
        return _ID_COUNT.pack(len(minutes)) + ids + packed_minutes(minutes)

    @staticmethod
    def decode_ids(payload: bytes) -> tuple[bytes, array[int]]:
        """The packed ids and minutes of an id record's payload."""
        if len(payload) < _ID_COUNT.size:
            raise SnapshotError("an id record is truncated")
        (count,) = _ID_COUNT.unpack_from(payload)
        if len(payload) != _ID_COUNT.size + count * (ID_SIZE + 4):
            raise SnapshotError("an id record has the wrong length")
        start = _ID_COUNT.size + count * ID_SIZE
        return payload[_ID_COUNT.size:start], minutes_array(payload[start:])

    @staticmethod
    def encode_manifest(manifest: Manifest) -> bytes:
        return manifest.model_dump_json().encode()

    @staticmethod
    def decode_manifest(payload: bytes) -> Manifest:
        try:
            return Manifest.model_validate_json(payload)
        except pydantic.ValidationError as exc:
            raise SnapshotError(f"the snapshot manifest does not validate: {exc}") from exc


def _state_models(aggregates: dict[str, Aggregate[Any]]) -> dict[str | None, type[_Aggregate[Any]]]:
    """The snapshot model of each aggregate; raises ``SnapshotError`` for a state no snapshot may hold
    (``Checkpoints`` then writes none, and says why).

    A state needs a typed form (a dataclass or a pydantic model), and must keep no field typed
    personal: the processor folds opened events, so such a field holds plaintext, and a
    snapshot would store it in the clear, out of the reach of erasure.
    """
    models: dict[str | None, type[_Aggregate[Any]]] = {None: _Aggregate[None]}
    for name, aggregate in aggregates.items():
        state_type = type(aggregate.initial)
        if not (is_dataclass(state_type) or issubclass(state_type, BaseModel)):
            raise SnapshotError(f"aggregate {name!r}: its state is a {state_type.__name__}, not a dataclass or "
                                "pydantic model, so it has no typed snapshot form", code="snapshot_state_untyped")
        personal = [field for field, hint in typing.get_type_hints(state_type, include_extras=True).items()
                    if _names_personal(hint)]
        if personal:
            raise SnapshotError(f"aggregate {name!r} keeps personal fields in its state ({', '.join(personal)}): "
                                "a snapshot would store their plaintext out of erasure's reach; keep personal "
                                "data in events only", code="snapshot_state_personal")
        models[name] = _Aggregate[state_type]  # type: ignore[valid-type]
    return models


def _names_personal(hint: Any) -> bool:
    """Whether a type hint is, or contains (in a union, a container), a ``personal(...)`` type."""
    if typing.get_origin(hint) is Annotated and any(isinstance(m, Personal) for m in hint.__metadata__):
        return True
    return any(_names_personal(arg) for arg in typing.get_args(hint))


def part_key(key: bytes, index: int) -> bytes:
    """The key of part ``index`` (1 on) of a long record."""
    return key + b"#" + str(index).encode()


def _source(module: ModuleType) -> bytes:
    return inspect.getsource(module).encode()
