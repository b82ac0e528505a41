"""The audit record encoding, the chain and the verifier, on in-memory chains (no I/O)."""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastavro import schemaless_writer
from fastavro.utils import generate_many
from hypothesis import given, settings
from hypothesis import strategies as st

import keel.trust.entries
from keel.contracts.catalog import load_catalog
from keel.contracts.codec import AVRO_CORE, MAGIC, EnvelopeCodec
from keel.contracts.native import audit_head as native_audit_head
from keel.domain.envelope import Authority
from support_desk.messages import EmailQueued, RefundIssued
from keel.domain.outcomes import to_events
from keel.trust.checkpoints import Checkpoint, CheckpointSigner, TrustedKeys
from keel.trust.entries import (
    BUNDLE_BYTES, BUNDLE_MAGIC, bundles, canonical_json, encode_receipt, entries_from_intake, entry_from_intake,
)
from keel.trust.errors import AuditFormatError
from keel.trust.record import GENESIS, AuditEntry, parse_record, record_hash, seal_record, unhashed
from keel.trust.verify import FailureKind, verify_chain
from tests.helpers import command, refund

CODEC = EnvelopeCodec()
SIGNER = CheckpointSigner("k1", Ed25519PrivateKey.generate())
TRUSTED = TrustedKeys({"k1": SIGNER.key.public_key()})


def event_bytes(tenant: str, n: int) -> list[bytes]:
    """``n`` real encoded events of ``tenant`` (refunds on one aggregate)."""
    out = []
    for i in range(n):
        cmd = command(tenant, "sub-1", refund(100 + i), on_behalf_of="cust-7",
                      authority=Authority(role="support", approval_id=f"appr-{i}"))
        [event] = to_events(cmd, [RefundIssued(amount_cents=100 + i, currency="EUR", reason="r")],
                            version=i, now=cmd.occurred_at)
        out.append(CODEC.encode(event))
    return out


def chain(tenant: str, values: list[bytes]) -> list[bytes]:
    """The chained records of ``values``, as the chainer builds them."""
    records, head = [], GENESIS
    for seq, value in enumerate(values, start=1):
        raw = seal_record(seq, head, entry_from_intake(value, tenant))
        records.append(raw)
        head = raw[-32:]
    return records


def checkpoint(records: list[bytes], tenant: str = "acme", signer: CheckpointSigner = SIGNER) -> Checkpoint:
    last = parse_record(records[-1])
    return signer.sign(tenant, last.seq, last.hash)


@pytest.fixture(scope="module")
def records() -> list[bytes]:
    return chain("acme", event_bytes("acme", 8))


def test_an_intact_chain_verifies_with_its_checkpoint(records: list[bytes]) -> None:
    report = verify_chain("acme", records, [checkpoint(records[:4]), checkpoint(records)], TRUSTED)
    assert report.ok, report.summary()
    assert (report.records, report.checkpoints, report.head) == (8, 2, parse_record(records[-1]).hash)


def test_record_holds_every_attributing_field_of_the_event(records: list[bytes]) -> None:
    event = CODEC.decode(parse_record(records[2]).entry.body)
    entry = parse_record(records[2]).entry
    assert (entry.tenant, entry.kind, entry.entry_id, entry.type) == ("acme", "event", str(event.id), "RefundIssued")
    assert (entry.aggregate_id, entry.version, entry.actor) == ("sub-1", 3, "agent:support-bot")
    assert (entry.on_behalf_of, entry.causation_id) == ("cust-7", str(event.causation_id))
    assert '"approval_id":"appr-2"' in (entry.authority or "")


def test_an_edited_byte_anywhere_in_a_record_is_detected(records: list[bytes]) -> None:
    for position in (5, 20, 60, len(records[3]) - 40, len(records[3]) - 1):
        edited = bytearray(records[3])
        edited[position] ^= 0x01
        report = verify_chain("acme", [*records[:3], bytes(edited), *records[4:]], [], TRUSTED)
        assert report.failure is not None and report.failure.seq == 4
        assert report.failure.kind in (FailureKind.EDITED, FailureKind.MALFORMED)


def test_reordered_records_are_detected_at_the_first_out_of_place_seq(records: list[bytes]) -> None:
    report = verify_chain("acme", [*records[:2], records[3], records[2], *records[4:]], [], TRUSTED)
    assert report.failure is not None and (report.failure.seq, report.failure.kind) == (3, FailureKind.REORDERED)


def test_a_deleted_record_is_detected(records: list[bytes]) -> None:
    report = verify_chain("acme", [*records[:5], *records[6:]], [], TRUSTED)
    assert report.failure is not None and (report.failure.seq, report.failure.kind) == (6, FailureKind.MISSING)


def test_a_truncated_tail_is_detected_against_the_latest_checkpoint(records: list[bytes]) -> None:
    report = verify_chain("acme", records[:6], [checkpoint(records)], TRUSTED)
    assert report.failure is not None and (report.failure.seq, report.failure.kind) == (7, FailureKind.TRUNCATED)


def test_a_consistently_rewritten_history_disagrees_with_the_signed_head(records: list[bytes]) -> None:
    signed = checkpoint(records)
    forged_values = [parse_record(r).entry.body for r in records]
    forged_values[1] = event_bytes("acme", 8)[5]  # rehash everything after the swap
    report = verify_chain("acme", chain("acme", forged_values), [signed], TRUSTED)
    assert report.failure is not None and (report.failure.seq, report.failure.kind) == (8, FailureKind.CHECKPOINT_MISMATCH)


def test_a_forged_checkpoint_and_an_unknown_signing_key_are_named(records: list[bytes]) -> None:
    genuine = checkpoint(records)
    forged = dataclasses.replace(genuine, seq=20)
    report = verify_chain("acme", records, [forged], TRUSTED)
    assert report.failure is not None and (report.failure.seq, report.failure.kind) == (20, FailureKind.FORGED_CHECKPOINT)
    stranger = checkpoint(records, signer=CheckpointSigner("k9", Ed25519PrivateKey.generate()))
    report = verify_chain("acme", records, [stranger], TRUSTED)
    assert report.failure is not None and report.failure.kind == FailureKind.UNKNOWN_SIGNING_KEY
    assert "k9" in report.failure.detail


def test_a_record_moved_from_another_tenant_is_detected(records: list[bytes]) -> None:
    other = chain("globex", event_bytes("globex", 8))
    report = verify_chain("acme", [*records[:4], other[4], *records[5:]], [], TRUSTED)
    assert report.failure is not None and (report.failure.seq, report.failure.kind) == (5, FailureKind.FOREIGN_TENANT)


def test_a_rotated_key_set_verifies_checkpoints_of_old_and_new_keys(records: list[bytes]) -> None:
    new = CheckpointSigner("k2", Ed25519PrivateKey.generate())
    both = TrustedKeys({"k1": SIGNER.key.public_key(), "k2": new.key.public_key()})
    assert verify_chain("acme", records, [checkpoint(records[:3]), checkpoint(records, signer=new)], both).ok


def test_no_bytes_can_move_between_fields() -> None:
    base = AuditEntry("acme", "event", "e1", "ab", "c", None, None, None, None, None, None, None, None, None, b"")
    shifted = base._replace(type="a", aggregate_id="bc")
    empty = base._replace(aggregate_id="")
    absent = base._replace(aggregate_id=None)
    hashes = {seal_record(1, GENESIS, e)[-32:] for e in (base, shifted, empty, absent)}
    assert len(hashes) == 4


def test_record_round_trips_and_its_hash_recomputes(records: list[bytes]) -> None:
    record = parse_record(records[0])
    assert seal_record(record.seq, record.prev_hash, record.entry) == records[0]
    assert record_hash(records[0]) == record.hash and record.prev_hash == GENESIS
    with pytest.raises(AuditFormatError):
        parse_record(b"KAR\x01" + bytes(50))


def test_receipts_and_unrecognised_bytes_are_chained_not_dropped() -> None:
    receipt = encode_receipt(tenant="acme", type="SubjectErased", receipt_id=uuid.uuid4(), actor="human:dpo",
                             on_behalf_of="cust-7", details={"key_ids": ["k"]})
    assert entry_from_intake(receipt, "acme").kind == "receipt"
    assert entry_from_intake(receipt, "globex").type == "TenantMismatch"
    assert entry_from_intake(b"garbage", "acme").type == "Unrecognised"
    sealed = EmailQueued.model_construct(to_address="keel-enc:v1:x:y", template="t", body=None)
    cmd = command("acme", "sub-1", refund(1))
    [event] = to_events(cmd, [sealed], version=0, now=cmd.occurred_at)
    assert entry_from_intake(CODEC.encode(event), "acme").type == "EmailQueued"


def test_a_bundle_is_chained_as_its_events_in_order_and_a_lone_event_goes_as_it_is() -> None:
    values = event_bytes("acme", 5)
    [bundle] = bundles(values)
    assert bundle.startswith(BUNDLE_MAGIC)
    assert entries_from_intake(bundle, "acme") == [entry_from_intake(value, "acme") for value in values]
    assert list(bundles(values[:1])) == values[:1]  # the event's own bytes: a record limit it met already
    assert list(bundles([])) == []


def test_bundles_stay_within_their_bound_and_lose_nothing() -> None:
    values = event_bytes("acme", 3) * (BUNDLE_BYTES // 600)
    made = list(bundles(values))
    assert len(made) > 1 and all(len(bundle) <= BUNDLE_BYTES + len(BUNDLE_MAGIC) for bundle in made)
    assert [entry.body for bundle in made for entry in entries_from_intake(bundle, "acme")] == values
    huge = b"x" * (BUNDLE_BYTES + 1)
    assert list(bundles([values[0], huge, values[1]])) == [values[0], huge, values[1]]


def test_a_bundle_whose_framing_breaks_is_chained_whole_and_another_tenants_event_in_it_is_not_let_in() -> None:
    [bundle] = bundles(event_bytes("acme", 2))
    for broken in (bundle[:-1], bundle + b"\x00", BUNDLE_MAGIC, BUNDLE_MAGIC + bytes(4) + bundle[4:]):
        [entry] = entries_from_intake(broken, "acme")
        assert (entry.kind, entry.type, entry.body) == ("opaque", "Undecodable", broken)
    [mixed] = bundles([*event_bytes("acme", 1), *event_bytes("globex", 1)])
    assert [entry.type for entry in entries_from_intake(mixed, "acme")] == ["RefundIssued", "TenantMismatch"]


@pytest.mark.skipif(AVRO_CORE != "native", reason="compares the native core's entries with fastavro's")
def test_an_entry_is_the_same_whichever_avro_core_reads_the_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain's records must not depend on the chainer's build: every type and version of the
    catalog, as written, gives the same entry and the same record bytes through either core."""
    values = []
    for schema in load_catalog().by_fingerprint.values():
        for record in generate_many(schema.parsed, 3):
            buffer = io.BytesIO(MAGIC + schema.fingerprint)
            buffer.seek(0, io.SEEK_END)
            schemaless_writer(buffer, schema.parsed, record)
            values.append((buffer.getvalue(), record["tenant_id"]))
    native = [entry_from_intake(value, tenant) for value, tenant in values]
    monkeypatch.setattr(keel.trust.entries, "native_plan", lambda _schema: None)
    assert native == [entry_from_intake(value, tenant) for value, tenant in values]
    assert {entry.kind for entry in native} == {"event"}


def test_checkpoint_json_round_trips_and_rejects_junk(records: list[bytes]) -> None:
    cp = checkpoint(records)
    assert Checkpoint.from_json(cp.to_json()) == cp
    with pytest.raises(AuditFormatError):
        Checkpoint.from_json('{"v": 1, "tenant": "acme"}')


def test_an_empty_chain_verifies_nothing_and_is_not_ok() -> None:
    report = verify_chain("ghost", [], [], TRUSTED)
    assert not report.ok and report.failure is None
    assert report.summary().startswith("NOTHING tenant=ghost: no audit records")


def test_checkpoints_that_came_with_the_records_leave_a_truncated_tail_undetectable(records: list[bytes]) -> None:
    cut = records[:6]  # the tail cut together with its checkpoint: it verifies exactly like the whole chain
    for report in (verify_chain("acme", records, [checkpoint(records)], TRUSTED),
                   verify_chain("acme", cut, [checkpoint(cut)], TRUSTED)):
        assert report.ok
        summary = report.summary()
        assert summary.startswith(f"OK (unanchored) tenant=acme records={report.records} checkpoints=1 anchored=0 ")
        assert summary.endswith("a truncated tail cannot be detected without --from-checkpoint")


def test_a_chain_without_any_checkpoint_says_nothing_signs_it(records: list[bytes]) -> None:
    summary = verify_chain("acme", records, [], TRUSTED).summary()
    assert summary.startswith("OK (unanchored) tenant=acme records=8 checkpoints=0 anchored=0 ")
    assert "no signed checkpoint at all" in summary and "a truncated tail" in summary


def test_only_an_anchor_covering_the_head_gives_a_plain_ok(records: list[bytes]) -> None:
    head = parse_record(records[-1]).hash.hex()
    report = verify_chain("acme", records, [checkpoint(records)], TRUSTED, anchors=[checkpoint(records)])
    assert report.summary() == f"OK tenant=acme records=8 checkpoints=1 anchored=8 head={head}"
    older = verify_chain("acme", records, [checkpoint(records)], TRUSTED, anchors=[checkpoint(records[:4])])
    assert older.ok and older.summary().startswith("OK (unanchored) tenant=acme records=8 checkpoints=2 anchored=4 ")
    assert "no trusted checkpoint covers records 5-8" in older.summary()


def test_an_anchor_reveals_a_tail_cut_together_with_its_checkpoints(records: list[bytes]) -> None:
    cut = records[:6]
    report = verify_chain("acme", cut, [checkpoint(cut)], TRUSTED, anchors=[checkpoint(records)])
    assert report.failure is not None and (report.failure.seq, report.failure.kind) == (7, FailureKind.TRUNCATED)
    assert report.summary().startswith("FAIL tenant=acme seq=7 kind=truncated: ")


def _json_dumps_text(value: Any) -> str:
    """What ``canonical_json`` has always written."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(_JSON_VALUES)
def test_canonical_json_writes_json_dumps_text(value: Any) -> None:
    """The chained text of any JSON value (floats, big integers, lone surrogates, control
    characters included) is exactly ``json.dumps``'s, whichever writer made it."""
    assert canonical_json(value) == _json_dumps_text(value)


@pytest.mark.parametrize("value", [
    {"role": "support-agent", "grant": None, "policy_rule": "r", "policy_version": "v1", "approval_id": None},
    [{"actor": {"kind": "human", "id": "jane.lead"}, "reason": "Zoë asked \u2028 \x00\x7f"}],
    {"z": 1, "a": [2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, True, False]},
    {1: "an integer key", 2: (1, 2)},  # not plain: json.dumps writes them
    {"at": datetime(2026, 12, 6, tzinfo=UTC), "id": uuid.UUID(int=5), "lone": "\ud800", "f": 1e16},
])
def test_canonical_json_edges(value: Any) -> None:
    assert canonical_json(value) == _json_dumps_text(value)


_FIELD_VALUES = st.one_of(st.none(), st.text(), st.binary(max_size=64), st.integers(min_value=-(2**70), max_value=2**70),
                          st.booleans())


@given(st.lists(_FIELD_VALUES, min_size=len(AuditEntry._fields), max_size=len(AuditEntry._fields)),
       st.integers(min_value=1, max_value=2**64 - 1), st.binary(min_size=32, max_size=32))
@settings(max_examples=300, deadline=None)
def test_the_native_core_writes_the_records_python_writes(values: list[Any], seq: int, prev: bytes) -> None:
    """The native writer's bytes are the reference's, or it leaves the entry to it (a bool, a lone surrogate)."""
    assert native_audit_head is not None, "make setup builds the native core (CI has cargo)"
    entry = AuditEntry(*values)
    prefix = b"KAR\x01" + seq.to_bytes(8, "big") + prev
    try:
        expected: bytes | None = unhashed(prefix, entry)
    except UnicodeEncodeError:  # a lone surrogate: Python refuses it too
        expected = None
    written = native_audit_head(prefix, entry)
    assert written == expected or (written is None and any(type(v) is bool for v in values))
    if expected is not None:
        assert seal_record(seq, prev, entry)[:-32] == expected


def test_the_native_core_leaves_subclasses_to_python() -> None:
    """``str()`` of a subclass of ``str`` or ``int`` may not be its value: only Python decides what it writes."""
    assert native_audit_head is not None, "make setup builds the native core (CI has cargo)"

    class Kind(str):
        def __str__(self) -> str:
            return "other"

    base = AuditEntry("acme", "event", "e1", "ab", "c", None, None, None, None, None, None, None, None, None, b"")
    odd = base._replace(kind=Kind("event"))
    assert native_audit_head(b"p", odd) is None and native_audit_head(b"p", base) is not None
    assert seal_record(1, GENESIS, odd) != seal_record(1, GENESIS, base)
    assert parse_record(seal_record(1, GENESIS, odd)).entry.kind == "other"
