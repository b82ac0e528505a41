"""Field encryption and the SQLite key store: round trips, binding, erasure, typed failures."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.domain.events import ApprovalKind, ApprovalRequested
from support_desk.messages import EmailQueued, IssueRefund, RefundIssued, SendEmail
from keel.domain.outcomes import to_events
from keel.trust.codec import SealingCodec
from keel.trust.errors import CorruptCiphertext, KeyUnwrapFailed, TrustError, UnknownKey, WrongTenantKey
from keel.trust.fields import ERASED, FieldCipher, personal_fields
from keel.trust.keystore import MasterKey
from keel.trust.keystore_sqlite import SqliteKeyStore
from tests.helpers import command

CODEC = EnvelopeCodec()


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[SqliteKeyStore]:
    with SqliteKeyStore(tmp_path / "keys.db", MasterKey(os.urandom(32))) as store:
        yield store


def email(tenant: str = "acme", subject: str | None = "cust-7", to: str = "ann@example.com") -> Envelope:
    cmd = command(tenant, "sub-1", SendEmail(to_address=to, template="t", body="secret body"),
                  on_behalf_of=subject)
    [event] = to_events(cmd, [EmailQueued(to_address=to, template="t", body="secret body")],
                        version=0, now=cmd.occurred_at)
    return event


def test_personal_fields_are_read_from_the_schema_attribute() -> None:
    assert personal_fields("EmailQueued") == ("to_address", "body")
    assert personal_fields("SendEmail") == ("to_address", "body")
    assert personal_fields("RefundIssued") == ()


def test_sealed_fields_survive_the_codec_and_open_to_the_plaintext(keys: SqliteKeyStore) -> None:
    cipher, event = FieldCipher(keys), email()
    sealed = cipher.seal(event)
    wire = CODEC.encode(sealed)
    assert b"ann@example.com" not in wire and b"secret body" not in wire and b"keel-enc:v1:" in wire
    assert cast(EmailQueued, sealed.payload).template == "t"  # not personal: untouched
    assert cipher.open(CODEC.decode(wire)) == event
    again = cipher.seal(event)
    assert cast(EmailQueued, again.payload).to_address != \
        cast(EmailQueued, sealed.payload).to_address  # a fresh nonce per field


def test_a_sealed_command_with_a_format_rule_still_encodes(keys: SqliteKeyStore) -> None:
    cmd = command("acme", "sub-1", SendEmail(to_address="bo@example.com", template="t"), on_behalf_of="cust-7")
    sealed = FieldCipher(keys).seal(cmd)
    assert re.match(r"^keel-enc:v1:[0-9a-f]{32}:", cast(SendEmail, sealed.payload).to_address)
    assert b"bo@example.com" not in CODEC.encode(sealed)


def test_a_ciphertext_moved_to_another_field_or_event_or_edited_does_not_open(keys: SqliteKeyStore) -> None:
    cipher = FieldCipher(keys)
    one, two = cipher.seal(email()), cipher.seal(email())
    swapped_field = one.model_copy(update={"payload": one.payload.model_copy(
        update={"body": cast(EmailQueued, one.payload).to_address})})
    moved_event = two.model_copy(update={"payload": one.payload})
    value = cast(EmailQueued, one.payload).to_address
    edited = one.model_copy(update={"payload": one.payload.model_copy(
        update={"to_address": value[:-6] + ("A" if value[-6] != "A" else "B") + value[-5:]})})
    for bad in (swapped_field, moved_event, edited):
        with pytest.raises(CorruptCiphertext) as caught:
            cipher.open(bad)
        assert caught.value.code == "corrupt_ciphertext" and caught.value.field is not None
        assert caught.value.field.startswith("payload.")


def test_unknown_key_and_wrong_tenant_key_are_typed_errors(keys: SqliteKeyStore) -> None:
    cipher = FieldCipher(keys)
    sealed = cipher.seal(email())
    other_tenant = sealed.model_copy(update={"tenant_id": "globex"})
    with pytest.raises(WrongTenantKey):
        cipher.open(other_tenant)
    key_id = cast(EmailQueued, sealed.payload).to_address.split(":")[2]
    unknown = sealed.model_copy(update={"payload": sealed.payload.model_copy(
        update={"to_address": cast(EmailQueued, sealed.payload).to_address.replace(key_id, "0" * 32)})})
    with pytest.raises(UnknownKey) as caught:
        cipher.open(unknown)
    assert "0" * 32 in caught.value.message


def test_erasure_shows_an_explicit_marker_and_new_data_gets_a_new_key(keys: SqliteKeyStore) -> None:
    cipher = FieldCipher(keys)
    sealed = cipher.seal(email())
    erased = keys.erase("acme", "cust-7", "human:dpo")
    assert len(erased) == 1
    tombstone = keys.tombstone(erased[0])
    assert tombstone is not None and tombstone.erased_by == "human:dpo"
    opened = cast(EmailQueued, cipher.open(sealed).payload)
    assert (opened.to_address, opened.body, opened.template) == (ERASED, ERASED, "t")
    assert keys.key_for("acme", "cust-7").key_id != erased[0]
    assert keys.erase("acme", "cust-7", "human:dpo") != erased  # the new key, not the old one again


def test_personal_data_without_a_subject_is_refused(keys: SqliteKeyStore) -> None:
    with pytest.raises(TrustError) as caught:
        FieldCipher(keys).seal(email(subject=None))
    assert caught.value.code == "personal_data_without_subject"


def test_a_key_store_opened_with_another_master_key_cannot_unwrap(tmp_path: Path) -> None:
    with SqliteKeyStore(tmp_path / "k.db", MasterKey(os.urandom(32))) as store:
        key_id = store.key_for("acme", "cust-7").key_id
    with SqliteKeyStore(tmp_path / "k.db", MasterKey(os.urandom(32))) as store:
        with pytest.raises(KeyUnwrapFailed):
            store.lookup("acme", key_id)


def test_messages_without_personal_fields_pass_the_sealing_codec_unchanged(keys: SqliteKeyStore) -> None:
    sealing = SealingCodec(FieldCipher(keys))
    cmd = command("acme", "sub-1", IssueRefund(amount_cents=5, currency="EUR", reason="late"), on_behalf_of="cust-7")
    [event] = to_events(cmd, [RefundIssued(amount_cents=5, currency="EUR", reason="late")], version=0,
                        now=cmd.occurred_at)
    for message in (cmd, event):
        assert FieldCipher(keys).seal(message) is message
        assert sealing.encode(message) == CODEC.encode(message)
        assert sealing.decode(CODEC.encode(message)) == message


def test_the_sealing_codec_opens_a_command_and_reseals_its_event_under_the_event_id(keys: SqliteKeyStore) -> None:
    sealing, event = SealingCodec(FieldCipher(keys)), email()
    cmd = command("acme", "sub-1", SendEmail(to_address="ann@example.com", template="t", body="secret body"),
                  on_behalf_of="cust-7")
    assert sealing.decode(sealing.encode(cmd)) == cmd
    wire = CODEC.decode(sealing.encode(event))
    assert cast(EmailQueued, wire.payload).to_address.startswith("keel-enc:v1:")
    assert sealing.decode(sealing.encode(event)) == event


def test_a_parked_command_travels_sealed_inside_its_approval_request(keys: SqliteKeyStore) -> None:
    parked = command("acme", "sub-1", SendEmail(to_address="ann@example.com", template="t", body="secret body"),
                     on_behalf_of="cust-7")
    [request] = to_events(parked, [ApprovalRequested(
        command_id=parked.id, command_type=parked.type, approval_kind=ApprovalKind.APPROVAL, policy_rule="r",
        policy_version="v", expires_at=parked.occurred_at, command=parked.model_dump_json())],
        version=0, now=parked.occurred_at)
    codec = SealingCodec(FieldCipher(keys))
    wire = codec.encode(request)
    assert b"ann@example.com" not in wire and b"secret body" not in wire
    stored = json.loads(
        cast(ApprovalRequested, CODEC.decode(wire).payload).command)  # what the projector and the chain keep
    assert stored["payload"]["to_address"].startswith("keel-enc:v1:")
    assert cast(ApprovalRequested, codec.decode(wire).payload).command == \
        cast(ApprovalRequested, request.payload).command  # the processor resumes it as sent
