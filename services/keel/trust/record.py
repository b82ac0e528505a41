"""The audit record and its hash: a versioned, domain-separated, length-prefixed encoding.

Wire format of one record (``KAR1``), all integers big-endian::

    magic   4 bytes   b"KAR\\x01"              (format and hash version)
    seq     8 bytes   unsigned, 1 for a tenant's first record
    prev   32 bytes   hash of record seq-1 (32 zero bytes for seq 1)
    fields            FIELDS in order, each b"\\x00" (absent) or b"\\x01" + u32 length + bytes
    hash   32 bytes   SHA-256(DOMAIN + every byte above)

The fields cover everything that attributes an entry (tenant, kind, entry id, type,
aggregate, version, actor, on-behalf-of, authority, delegation, causation, correlation,
time, schema version) and ``body``, the entry's exact stored bytes (for events the Avro
single-object encoding, personal fields as ciphertext). Because every field has a fixed
slot and a length, no byte can move from one field to another, and the tenant and sequence
are inside the hash, so a record cannot be re-attributed, renumbered or moved unnoticed.
Hand-written because it is the hash input: it must never depend on a library's encoding.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from keel.contracts.native import audit_head
from keel.trust.errors import AuditFormatError

MAGIC = b"KAR\x01"
DOMAIN = b"keel.audit.record.v1\x00"
HASH_SIZE = 32
GENESIS = bytes(HASH_SIZE)
_SEQ = struct.Struct(">Q")
_LEN = struct.Struct(">I")
_PREFIX = len(MAGIC) + _SEQ.size + HASH_SIZE
_HASHER = hashlib.sha256(DOMAIN)
_ABSENT, _PRESENT = b"\x00", b"\x01"


class AuditEntry(NamedTuple):
    """What is chained: one event or receipt, with the fields that attribute it, in their record order.

    A tuple, not a frozen dataclass: the chainer builds one per event, and a frozen dataclass's
    ``__init__`` sets each of its 15 fields through ``object.__setattr__``.
    """

    tenant: str
    kind: str  # "event" (from the processor), "receipt" (erasure, isolation...), "opaque"
    entry_id: str
    type: str
    aggregate_id: str | None
    version: int | None
    actor: str | None  # "<kind>:<id>"
    on_behalf_of: str | None
    authority: str | None  # canonical JSON of the authority record
    delegation: str | None  # canonical JSON of the delegation chain
    causation_id: str | None
    correlation_id: str | None
    occurred_at_us: int | None
    schema_version: int | None
    body: bytes


FIELDS = AuditEntry._fields


@dataclass(frozen=True)
class AuditRecord:
    """One link of a tenant's chain: its position, the previous hash, the entry, its hash."""

    seq: int
    prev_hash: bytes
    entry: AuditEntry
    hash: bytes
    raw: bytes

    @property
    def tenant(self) -> str:
        return self.entry.tenant


def seal_record(seq: int, prev_hash: bytes, entry: AuditEntry) -> bytes:
    """The wire bytes of ``entry`` as record ``seq`` after ``prev_hash``, hash appended.

    The native core writes the fields when it is there (the chainer seals one record per event:
    a loop turn, a ``struct.pack`` and an encode per field were a third of its Python time);
    ``unhashed`` is the reference, and writes what the native core leaves to it.
    """
    if seq < 1 or len(prev_hash) != HASH_SIZE:
        raise ValueError("seq starts at 1 and prev_hash is 32 bytes")
    prefix = MAGIC + _SEQ.pack(seq) + prev_hash
    written = None if audit_head is None else audit_head(prefix, entry)
    data = written if written is not None else unhashed(prefix, entry)
    hasher = _HASHER.copy()
    hasher.update(data)
    return data + hasher.digest()


def unhashed(prefix: bytes, entry: AuditEntry) -> bytes:
    """``prefix`` (magic, seq, previous hash) and the fields of ``entry``: the record before its hash."""
    parts = [prefix]
    for value in entry:
        if value is None:
            parts.append(_ABSENT)
            continue
        data = value if isinstance(value, bytes) else str(value).encode()
        parts += (_PRESENT, _LEN.pack(len(data)), data)
    return b"".join(parts)


def record_hash(raw: bytes) -> bytes:
    """The hash a record's bytes should carry (recomputed, not read)."""
    hasher = _HASHER.copy()
    hasher.update(memoryview(raw)[:-HASH_SIZE])
    return hasher.digest()


def peek(raw: bytes) -> tuple[int, bytes, str, bytes]:
    """Seq, prev hash, tenant and stored hash of a record, without parsing the rest (fast path)."""
    if raw[:4] != MAGIC or len(raw) < _PREFIX + 5 + HASH_SIZE or raw[_PREFIX] != 1:
        raise AuditFormatError("not a KAR1 audit record")
    (length,) = _LEN.unpack_from(raw, _PREFIX + 1)
    start = _PREFIX + 5
    return (_SEQ.unpack_from(raw, 4)[0], raw[12:_PREFIX], raw[start:start + length].decode(),
            raw[-HASH_SIZE:])


def parse_record(raw: bytes) -> AuditRecord:
    """Every field of a record; raises ``AuditFormatError`` on anything malformed."""
    if raw[:4] != MAGIC or len(raw) < _PREFIX + HASH_SIZE:
        raise AuditFormatError("not a KAR1 audit record (bad magic or too short)")
    pos, end = _PREFIX, len(raw) - HASH_SIZE
    values: list[bytes | None] = []
    for name in FIELDS:
        if pos >= end:
            raise AuditFormatError(f"audit record ends before field {name}")
        if raw[pos] == 0:
            values.append(None)
            pos += 1
            continue
        if raw[pos] != 1 or pos + 5 > end:
            raise AuditFormatError(f"bad presence byte or length of field {name}")
        (length,) = _LEN.unpack_from(raw, pos + 1)
        data = raw[pos + 5:pos + 5 + length]
        if len(data) != length or pos + 5 + length > end:
            raise AuditFormatError(f"field {name} runs past the end of the record")
        values.append(data)
        pos += 5 + length
    if pos != end:
        raise AuditFormatError("trailing bytes after the last field")
    decoded: dict[str, Any] = {n: (v if n == "body" or v is None else v.decode())
                               for n, v in zip(FIELDS, values, strict=True)}
    for n in ("version", "occurred_at_us", "schema_version"):
        decoded[n] = None if decoded[n] is None else int(decoded[n])
    entry = AuditEntry(**decoded)
    return AuditRecord(_SEQ.unpack_from(raw, 4)[0], raw[12:_PREFIX], entry, raw[-HASH_SIZE:], raw)
