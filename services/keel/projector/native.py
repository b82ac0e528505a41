"""Native batch inserts for embedded ClickHouse: the engine decodes the Avro, not Python.

A record's single-object body is already Avro binary, so a batch needs no decoding in
Python: bodies of one writer schema are concatenated into an Avro object container (a
cached header and one block, each body prefixed by its Kafka position as a 12-byte fixed
field) and one ``INSERT ... SELECT ... FROM file(..., 'Avro') UNION ALL ...`` maps every
schema's records to the table's columns. Decoding moves from ~20k records/s (fastavro and
pydantic) to the engine's C++. The mapping mirrors ``keel.projector.rows``: the same
columns, and JSON with the fields in schema order.

Records whose writer schema is not the newest of their type are decoded and re-encoded
with the newest one first, so Avro schema resolution applies exactly as in ``EnvelopeCodec``.
Only chDB reads the files the process writes; a server keeps the Python path. If the
engine refuses a batch (a corrupt body), the caller falls back to the Python path.
Values sealed under erased keys are replaced in the payload JSON by the same statement.

The container files live in a folder of this process under ``<data dir>/native-scratch``,
removed on close. A process that is killed cannot remove its folder, so each inserter first
removes the folders of processes that no longer run.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from fastavro import parse_schema, writer

from keel.contracts.catalog import MessageSchema
from keel.contracts.codec import HEADER_SIZE, MAGIC, EnvelopeCodec
from keel.errors import DecodeError
from keel.kafka.broker import pid_alive
from keel.projector.rows import EVENT_COLUMNS
from keel.trust.erased import Erased

_SYNC = b"keel-native-sync"  # 16 bytes, the container's block separator
_POSITION = struct.Struct(">IQ")
_PACK = _POSITION.pack
_JSON_SETTINGS = {"output_format_json_quote_64bit_integers": 0, "output_format_json_escape_forward_slashes": 0,
                  "output_format_json_quote_decimals": 0}
_ONE_USE_FILES = {"schema_inference_use_cache_for_file": 0, "use_cache_for_count_from_files": 0}
"""Each batch's file has a new name and is read once: the engine's schema inference cache would keep an
entry per file (its schema and row count) up to 4,096, which grew the projector by ~150 MiB over its
first 14 minutes of steady load (found by the soak)."""

_COLUMNS = {
    "tenant_id": "e.tenant_id", "aggregate_id": "e.aggregate_id", "version": "e.version", "event_id": "e.id",
    "type": "e.type", "schema_version": "{schema_version}", "actor_kind": "toString(e.actor.kind)",
    "actor_id": "e.actor.id", "delegation": "toJSONString(e.delegation)", "on_behalf_of": "e.on_behalf_of",
    "authority_role": "e.authority.role", "authority_grant": "e.authority.grant",
    "authority_policy_rule": "e.authority.policy_rule", "authority_policy_version": "e.authority.policy_version",
    "authority_approval_id": "e.authority.approval_id", "expected_version": "e.expected_version",
    "causation_id": "e.causation_id", "correlation_id": "e.correlation_id", "occurred_at": "e.occurred_at",
    "traceparent": "e.traceparent", "payload": "toJSONString(e.payload)", "_topic": "{topic}",
    "_partition": "reinterpretAsUInt32(reverse(substring(pos, 1, 4)))",
    "_offset": "reinterpretAsUInt64(reverse(substring(pos, 5, 8)))",
}
assert tuple(_COLUMNS) == EVENT_COLUMNS


@dataclass
class NativeBatch:
    """Undecoded record bodies grouped by writer schema, with their positions."""

    bodies: dict[bytes, list[bytes]] = field(default_factory=dict)
    count: int = 0

    def add(self, fingerprint: bytes, partition: int, offset: int, body: bytes) -> None:
        """Append one body written with ``fingerprint``, read at ``partition``/``offset``."""
        bodies = self.bodies.get(fingerprint)
        if bodies is None:
            bodies = self.bodies[fingerprint] = []
        bodies.append(_PACK(partition, offset) + body)
        self.count += 1

    def records(self) -> Iterator[bytes]:
        """Every body held, behind its position (what to look for sealed values in)."""
        return (body for bodies in self.bodies.values() for body in bodies)


class NativeInserter:
    """Builds container files for a batch and inserts them in one statement."""

    def __init__(self, codec: EnvelopeCodec, scratch_root: Path) -> None:
        self._codec = codec
        self._headers: dict[bytes, bytes] = {}
        self._newest: dict[bytes, bool] = {}  # fingerprint -> is it its type's newest schema
        scratch_root.mkdir(parents=True, exist_ok=True)
        remove_orphans(scratch_root)
        self._scratch = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=scratch_root))

    def accept(self, batch: NativeBatch, value: bytes, partition: int, offset: int) -> None:
        """Add ``value`` to ``batch``; raises ``DecodeError`` when it is not a Keel message."""
        if len(value) < HEADER_SIZE or value[:2] != MAGIC:
            raise DecodeError("not an Avro single-object message (bad magic or too short)")
        fingerprint = value[2:HEADER_SIZE]
        newest = self._newest.get(fingerprint)
        if newest is None:
            schema = self._codec.catalog.writer(fingerprint)
            newest = self._newest[fingerprint] = schema is self._codec.catalog.latest(schema.message_type)
        if not newest:
            value = self._codec.encode(self._codec.decode(value))  # resolve into the newest schema
            fingerprint = value[2:HEADER_SIZE]
        batch.add(fingerprint, partition, offset, value[HEADER_SIZE:])

    def insert(self, client: Client, table: str, topic: str, batch: NativeBatch, token: str, erased: Erased) -> None:
        """Insert ``batch`` into ``table`` in one statement carrying ``token``, ``erased`` keys' values redacted."""
        columns = {**_COLUMNS, "payload": erased.sql(_COLUMNS["payload"])}
        files = []
        try:
            selects = []
            for fingerprint, bodies in batch.bodies.items():
                path = self._scratch / f"{uuid.uuid4().hex}.avro"
                path.write_bytes(self._header(fingerprint) + _long(len(bodies))
                                 + _long(sum(map(len, bodies))) + b"".join(bodies) + _SYNC)
                files.append(path)
                schema = self._codec.catalog.writer(fingerprint)
                mapped = ", ".join(f"{expr} AS {name}" for name, expr in columns.items()).format(
                    schema_version=schema.payload_version, topic=_quote(topic))
                selects.append(f"SELECT {mapped} FROM file({_quote(str(path))}, 'Avro')")
            names = ", ".join(EVENT_COLUMNS)
            client.command(f"INSERT INTO {quote_identifier(table)} ({names}) " + " UNION ALL ".join(selects),
                           settings={**_JSON_SETTINGS, "insert_deduplication_token": token,
                                     "deduplicate_blocks_in_dependent_materialized_views": 1,
                                     "max_insert_threads": 1, **_ONE_USE_FILES})
        finally:
            for path in files:
                path.unlink(missing_ok=True)

    def decoded(self, batch: NativeBatch) -> list[tuple[bytes, int, int]]:
        """The batch's records as (single-object value, partition, offset), for the Python path."""
        return [(MAGIC + fingerprint + body[_POSITION.size:], *_POSITION.unpack(body[:_POSITION.size]))
                for fingerprint, bodies in batch.bodies.items() for body in bodies]

    def close(self) -> None:
        """Remove the scratch folder."""
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _header(self, fingerprint: bytes) -> bytes:
        header = self._headers.get(fingerprint)
        if header is None:
            header = self._headers[fingerprint] = _container_header(self._codec.catalog.writer(fingerprint))
        return header


def remove_orphans(scratch_root: Path) -> None:
    """Remove the scratch folders (``<pid>-…``) under ``scratch_root`` of processes that no longer run."""
    for folder in scratch_root.iterdir():
        pid = folder.name.partition("-")[0]
        if folder.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _container_header(schema: MessageSchema) -> bytes:
    wrapped = {"type": "record", "name": "Positioned", "namespace": "keel.native", "fields": [
        {"name": "pos", "type": {"type": "fixed", "name": "Position", "size": _POSITION.size}},
        {"name": "e", "type": schema.parsed}]}
    buffer = io.BytesIO()
    writer(buffer, parse_schema(wrapped), [], sync_marker=_SYNC, codec="null")
    return buffer.getvalue()


def _long(value: int) -> bytes:
    """Avro's zig-zag varint encoding of a long."""
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
