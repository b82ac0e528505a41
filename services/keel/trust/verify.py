"""Verify one tenant's chain from genesis against its signed checkpoints.

Every checkpoint must verify under a trusted key; then each record's recomputed hash,
tenant, sequence and link are checked in order, and each checkpointed head must match.
The first failure is reported with its sequence number and kind; nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from keel.trust.checkpoints import Checkpoint, TrustedKeys
from keel.trust.errors import AuditFormatError, BadSignature, UnknownSigningKey
from keel.trust.record import _HASHER, _LEN, _SEQ, GENESIS, HASH_SIZE, MAGIC, peek, record_hash


class FailureKind(StrEnum):
    """What went wrong at the first bad sequence number."""

    EDITED = "edited_record"  # a record's bytes no longer match its hash
    MALFORMED = "malformed_record"  # bytes that are not an audit record
    FOREIGN_TENANT = "foreign_tenant"  # a record of another tenant's chain
    MISSING = "missing_record"  # a sequence number is absent: a deleted record
    REORDERED = "reordered"  # a record appears before one it follows
    DUPLICATE = "duplicate_record"  # a sequence number appears twice
    BROKEN_LINK = "broken_link"  # prev hash is not the previous record's hash
    TRUNCATED = "truncated"  # the chain ends before the latest trusted checkpoint
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"  # a signed head disagrees with the record
    FORGED_CHECKPOINT = "forged_checkpoint"  # signature does not verify
    UNKNOWN_SIGNING_KEY = "unknown_signing_key"  # signed by a key not in the trusted set
    CONFLICTING_CHECKPOINTS = "conflicting_checkpoints"  # two authentic heads for one seq


@dataclass(frozen=True)
class Failure:
    """The first problem found: where and what."""

    seq: int
    kind: FailureKind
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of verifying one tenant's chain."""

    tenant: str
    records: int
    checkpoints: int
    head: bytes
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def summary(self) -> str:
        """One line a person reads."""
        if self.failure is None:
            return (f"OK tenant={self.tenant} records={self.records} checkpoints={self.checkpoints} "
                    f"head={self.head.hex()}")
        f = self.failure
        return f"FAIL tenant={self.tenant} seq={f.seq} kind={f.kind.value}: {f.detail}"


def verify_chain(tenant: str, records: Iterable[bytes], checkpoints: Iterable[Checkpoint],
                 trusted: TrustedKeys) -> VerifyReport:
    """Verify ``records`` (in log order) of ``tenant`` against authentic ``checkpoints``."""
    anchors: dict[int, bytes] = {}
    count = 0
    for cp in checkpoints:
        if cp.tenant != tenant:
            continue
        count += 1
        try:
            trusted.check(cp)
        except UnknownSigningKey as exc:
            return _fail(tenant, 0, count, GENESIS, cp.seq, FailureKind.UNKNOWN_SIGNING_KEY, exc.message)
        except BadSignature as exc:
            return _fail(tenant, 0, count, GENESIS, cp.seq, FailureKind.FORGED_CHECKPOINT, exc.message)
        if anchors.setdefault(cp.seq, cp.head) != cp.head:
            return _fail(tenant, 0, count, GENESIS, cp.seq, FailureKind.CONFLICTING_CHECKPOINTS,
                         f"two authentic checkpoints disagree on the hash of record {cp.seq}")
    rest = records if isinstance(records, list) else list(records)
    tenant_field, copy, pack, head = _tenant_field(tenant), _HASHER.copy, _SEQ.pack, GENESIS
    # The hot loop (>= 500k records/s is the target): one hash and four slice compares per record;
    # the precise diagnosis runs only for the first record that fails any of them.
    for index, raw in enumerate(rest):
        hasher = copy()
        hasher.update(raw[:-HASH_SIZE])
        stored = raw[-HASH_SIZE:]
        if (hasher.digest() != stored or not raw.startswith(MAGIC + pack(index + 1))
                or raw[12:44] != head or not raw.startswith(tenant_field, 44)):
            return _diagnose(tenant, rest, index, head, count)
        head = stored
        if index + 1 in anchors and anchors[index + 1] != head:
            anchor = anchors[index + 1]
            return _fail(tenant, index + 1, count, head, index + 1, FailureKind.CHECKPOINT_MISMATCH,
                         f"record {index + 1} hash {head.hex()[:16]}… differs from the signed {anchor.hex()[:16]}…")
    latest = max(anchors, default=0)
    if latest > len(rest):
        return _fail(tenant, len(rest), count, head, len(rest) + 1, FailureKind.TRUNCATED,
                     f"chain ends at {len(rest)}, a trusted checkpoint covers {latest}")
    return VerifyReport(tenant, len(rest), count, head)


def _tenant_field(tenant: str) -> bytes:
    data = tenant.encode()
    return b"\x01" + _LEN.pack(len(data)) + data


def _diagnose(tenant: str, rest: list[bytes], index: int, head: bytes, count: int) -> VerifyReport:
    """The precise failure of the record at ``index``, which a fast check rejected."""
    expected, raw = index + 1, rest[index]
    try:
        seq, prev, owner, stored = peek(raw)
    except (AuditFormatError, UnicodeDecodeError) as exc:
        return _fail(tenant, index, count, head, expected, FailureKind.MALFORMED, str(exc))
    if record_hash(raw) != stored:
        return _fail(tenant, index, count, head, expected, FailureKind.EDITED,
                     f"record at position {expected} (claims seq {seq}) does not match its hash")
    if owner != tenant:
        return _fail(tenant, index, count, head, expected, FailureKind.FOREIGN_TENANT,
                     f"record seq {seq} belongs to tenant {owner!r}")
    if seq != expected:
        kind, detail = _misplaced(rest[index + 1:], seq, expected)
        return _fail(tenant, index, count, head, expected, kind, detail)
    return _fail(tenant, index, count, head, expected, FailureKind.BROKEN_LINK,
                 f"record {seq} does not link to record {seq - 1}")


def _misplaced(rest: list[bytes], seq: int, expected: int) -> tuple[FailureKind, str]:
    """Tell a deleted record from a reordered or duplicated one by looking ahead (only on failure)."""
    if seq < expected:
        return FailureKind.DUPLICATE, f"record {seq} appears again where {expected} was expected"
    for raw in rest:
        try:
            if peek(raw)[0] == expected:
                return FailureKind.REORDERED, f"record {seq} appears before record {expected}"
        except (AuditFormatError, UnicodeDecodeError):
            continue
    return FailureKind.MISSING, f"record {expected} is missing (next is {seq})"


def _fail(tenant: str, records: int, checkpoints: int, head: bytes, seq: int, kind: FailureKind,
          detail: str) -> VerifyReport:
    return VerifyReport(tenant, records, checkpoints, head, Failure(seq, kind, detail))
