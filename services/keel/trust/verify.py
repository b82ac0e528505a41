"""Verify one tenant's chain from genesis against its signed checkpoints.

Every checkpoint must verify under a trusted key; then each record's recomputed hash,
tenant, sequence and link are checked in order, and each checkpointed head must match.
The first failure is reported with its sequence number and kind; nothing is skipped.

Checkpoints that come with the records (the Kafka checkpoint topic, the export being
verified) can be cut along with them; only *anchors*, checkpoints kept elsewhere, reveal a
tail truncated together with its checkpoints. So the verdict, the first word of
``VerifyReport.summary``, is one of:

* ``OK``: intact, and an anchor covers the head (``anchored`` equals ``records``);
* ``OK (unanchored)``: intact, but no anchor covers the head, so a truncated tail cannot be
  detected (and with no checkpoint at all, neither can a chain rewritten from genesis);
* ``FAIL``: the first bad sequence number and the kind of failure;
* ``NOTHING``: the tenant has no records and no checkpoint claims one, so nothing was verified.
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
    checkpoints: int  # distinct authentic signed heads of the tenant
    head: bytes
    failure: Failure | None = None
    anchored: int = 0  # the latest seq an anchor (a checkpoint kept elsewhere) vouches for; 0: none

    @property
    def ok(self) -> bool:
        """Intact and not empty: an empty chain proves nothing."""
        return self.failure is None and self.records > 0

    def summary(self) -> str:
        """One line a person reads; its first word (OK, FAIL, NOTHING) is the verdict a script reads."""
        if self.failure is not None:
            f = self.failure
            return f"FAIL tenant={self.tenant} seq={f.seq} kind={f.kind.value}: {f.detail}"
        if self.records == 0:
            return (f"NOTHING tenant={self.tenant}: no audit records (an unknown tenant, none chained yet, "
                    "or an empty export), so nothing was verified")
        facts = (f"tenant={self.tenant} records={self.records} checkpoints={self.checkpoints} "
                 f"anchored={self.anchored} head={self.head.hex()}")
        if self.anchored == self.records:
            return f"OK {facts}"
        return f"OK (unanchored) {facts}: {self._unanchored_because()}"

    def _unanchored_because(self) -> str:
        if self.checkpoints == 0:
            return ("no signed checkpoint at all: only the links between records were checked, so neither a "
                    "truncated tail nor a chain rewritten from genesis can be detected without --from-checkpoint")
        if self.anchored == 0:
            return ("its checkpoints came with the records and can be cut with them, so a truncated tail "
                    "cannot be detected without --from-checkpoint")
        return (f"no trusted checkpoint covers records {self.anchored + 1}-{self.records}, so their truncation "
                "cannot be detected without a newer --from-checkpoint")


def verify_chain(tenant: str, records: Iterable[bytes], checkpoints: Iterable[Checkpoint],
                 trusted: TrustedKeys, anchors: Iterable[Checkpoint] = ()) -> VerifyReport:
    """Verify ``records`` (in log order) of ``tenant`` against authentic ``checkpoints`` and ``anchors``.

    ``checkpoints`` come with the records; ``anchors`` were kept elsewhere, so they also vouch that
    the chain reaches their seq (``VerifyReport.anchored``).
    """
    heads: dict[int, bytes] = {}
    anchored = 0
    sources = [*((cp, False) for cp in checkpoints), *((cp, True) for cp in anchors)]
    for cp, kept_elsewhere in sources:
        if cp.tenant != tenant:
            continue
        try:
            trusted.check(cp)
        except UnknownSigningKey as exc:
            return _fail(tenant, 0, len(heads), GENESIS, cp.seq, FailureKind.UNKNOWN_SIGNING_KEY, exc.message)
        except BadSignature as exc:
            return _fail(tenant, 0, len(heads), GENESIS, cp.seq, FailureKind.FORGED_CHECKPOINT, exc.message)
        if heads.setdefault(cp.seq, cp.head) != cp.head:
            return _fail(tenant, 0, len(heads), GENESIS, cp.seq, FailureKind.CONFLICTING_CHECKPOINTS,
                         f"two authentic checkpoints disagree on the hash of record {cp.seq}")
        if kept_elsewhere:
            anchored = max(anchored, cp.seq)
    count = len(heads)  # distinct signed heads: one checkpoint read from two sources counts once
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
        if index + 1 in heads and heads[index + 1] != head:
            anchor = heads[index + 1]
            return _fail(tenant, index + 1, count, head, index + 1, FailureKind.CHECKPOINT_MISMATCH,
                         f"record {index + 1} hash {head.hex()[:16]}… differs from the signed {anchor.hex()[:16]}…")
    latest = max(heads, default=0)
    if latest > len(rest):
        return _fail(tenant, len(rest), count, head, len(rest) + 1, FailureKind.TRUNCATED,
                     f"chain ends at {len(rest)}, a trusted checkpoint covers {latest}")
    return VerifyReport(tenant, len(rest), count, head, anchored=anchored)


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
