"""The one rule of what a person reads: plaintext if revealed, ⟨erased⟩ once the key is gone, ⟨sealed⟩ otherwise."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.domain.outcomes import to_events
from keel.domain.personal import ERASED, SEALED
from keel.errors import ConfigError
from keel.kafka.topics import Topic
from keel.replay.sinks import JsonLinesSink
from keel.trust.entries import RECEIPT_MAGIC
from keel.trust.fields import PREFIX, FieldCipher
from keel.trust.keystore import MasterKey
from keel.trust.keystore_sqlite import SqliteKeyStore
from keel.trust.record import parse_record
from keel.trust.reveal import PERSONAL_DATA_READ, Disclosure, Reader, holds_sealed, record_reads
from keel.trust.show import render_trail
from support_desk.messages import EmailQueued, SendEmail
from tests.helpers import command
from tests.unit.test_audit_show import chain

MAIL = "ann@example.com"


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[SqliteKeyStore]:
    with SqliteKeyStore(tmp_path / "keys.db", MasterKey(os.urandom(32))) as store:
        yield store


def sealed_email(cipher: FieldCipher, subject: str = "cust-7") -> Envelope:
    """An EmailQueued event as the processor writes it: personal fields sealed under the event id."""
    cmd = command("acme", "sub-1", SendEmail(to_address=MAIL, template="t", body="secret body"), on_behalf_of=subject)
    [event] = to_events(cmd, [EmailQueued(to_address=MAIL, template="t", body="secret body")], version=0,
                        now=cmd.occurred_at)
    return cipher.seal(event)


def test_without_reveal_a_sealed_value_reads_sealed_and_once_its_key_is_erased_erased(keys: SqliteKeyStore) -> None:
    cipher = FieldCipher(keys)
    event = sealed_email(cipher)

    before = cast(EmailQueued, Reader(cipher).envelope(event).payload)
    keys.erase("acme", "cust-7", "human:dpo")
    after = cast(EmailQueued, Reader(cipher).envelope(event).payload)

    assert (before.to_address, before.body, before.template) == (SEALED, SEALED, "t")
    assert (after.to_address, after.body, after.template) == (ERASED, ERASED, "t")


def test_revealing_opens_personal_fields_and_remembers_what_it_showed_per_tenant_and_subject(
        keys: SqliteKeyStore) -> None:
    cipher = FieldCipher(keys)
    event = sealed_email(cipher)
    reader = Reader(cipher, reveal=True)

    shown = cast(EmailQueued, reader.envelope(event).payload)

    assert (shown.to_address, shown.body) == (MAIL, "secret body")
    assert reader.take() == [Disclosure("acme", "cust-7", {str(event.causation_id): frozenset({"to_address", "body"})})]
    assert reader.take() == []  # taken once


def test_an_erased_value_is_not_revealed_and_no_read_is_remembered(keys: SqliteKeyStore) -> None:
    cipher = FieldCipher(keys)
    event = sealed_email(cipher)
    keys.erase("acme", "cust-7", "human:dpo")
    reader = Reader(cipher, reveal=True)

    assert cast(EmailQueued, reader.envelope(event).payload).to_address == ERASED
    assert reader.take() == []


def test_a_record_without_its_subject_opens_with_the_subject_of_the_key(keys: SqliteKeyStore) -> None:
    cipher = FieldCipher(keys)
    event = sealed_email(cipher)
    reader = Reader(cipher, reveal=True)

    shown = reader.payload(event.payload.model_dump(mode="json"), message_type="EmailQueued", tenant="acme",
                           subject=None, entry_id=str(event.id), command_id="c-1")

    assert shown["to_address"] == MAIL
    assert [(d.subject, dict(d.fields)) for d in reader.take()] == [
        ("cust-7", {"c-1": frozenset({"to_address", "body"})})]


def test_sealed_values_outside_personal_fields_are_marked_and_never_opened(keys: SqliteKeyStore) -> None:
    cipher = FieldCipher(keys)
    event = sealed_email(cipher)
    inner = json.dumps(event.payload.model_dump(mode="json"))  # e.g. a parked command kept as JSON text
    reader = Reader(cipher, reveal=True)

    shown = reader.payload({"command": inner, "notes": [inner]}, message_type=None, tenant="acme", subject="cust-7",
                           entry_id="x", command_id="c-1")

    assert PREFIX not in json.dumps(shown) and shown["command"].count(SEALED) == 2
    assert reader.take() == []
    keys.erase("acme", "cust-7", "human:dpo")
    assert Reader(cipher).masked(inner).count(ERASED) == 2


def test_without_a_key_store_every_sealed_value_reads_sealed_and_revealing_is_refused() -> None:
    reader = Reader(None)
    assert reader.masked(f"{PREFIX}abc:AAAA") == SEALED
    assert reader.masked(f"to {PREFIX}abc:AAAA, cut {PREFIX}") == f"to {SEALED}, cut {SEALED}"
    assert reader.masked(ERASED) == ERASED and reader.masked(MAIL) == MAIL
    with pytest.raises(ConfigError) as refused:
        Reader(None, reveal=True)
    assert refused.value.code == "master_key_missing"


def test_holds_sealed_looks_into_nested_values() -> None:
    assert holds_sealed({"a": [1, {"b": f"x {PREFIX}k:AA"}]})
    assert not holds_sealed({"a": [1, {"b": SEALED}], "c": None})


def test_a_personal_type_accepts_the_sealed_marker() -> None:
    assert SendEmail(to_address=SEALED, template="t", body=SEALED).to_address == SEALED


def test_record_reads_appends_one_receipt_per_tenant_and_subject_on_their_behalf() -> None:
    produced: list[tuple[Topic, list[tuple[bytes, bytes]]]] = []

    def produce(_settings: Settings, topic: Topic, items: Iterable[tuple[bytes, bytes]]) -> None:
        produced.append((topic, list(items)))

    reads = [Disclosure("acme", "cust-1", {"c-1": frozenset({"to_address"})}),
             Disclosure("globex", "cust-2", {"c-2": frozenset({"body"}), "c-3": frozenset({"to_address"})})]
    record_reads(Settings(), reads, actor="human:dpo", via="keel state", produce=produce)
    record_reads(Settings(), [], actor="human:dpo", via="keel state", produce=produce)  # nothing read: nothing sent

    [(topic, items)] = produced
    receipts = [(key, json.loads(value.removeprefix(RECEIPT_MAGIC))) for key, value in items]
    assert topic is Topic.AUDIT_INTAKE
    assert [(key, r["type"], r["actor"], r["on_behalf_of"]) for key, r in receipts] == [
        (b"acme", PERSONAL_DATA_READ, "human:dpo", "cust-1"), (b"globex", PERSONAL_DATA_READ, "human:dpo", "cust-2")]
    assert receipts[0][1]["details"] == {"via": "keel state", "command_id": "c-1", "fields": ["to_address"]}
    assert receipts[1][1]["details"] == {"via": "keel state", "command_ids": ["c-2", "c-3"],
                                         "fields": ["body", "to_address"]}


def test_the_audit_trail_shows_personal_fields_as_the_reader_sees_them(keys: SqliteKeyStore) -> None:
    cipher = FieldCipher(keys)
    records = [parse_record(raw) for raw in chain(EnvelopeCodec().encode(sealed_email(cipher)))]

    [marked] = render_trail(records)
    [sealed] = render_trail(records, Reader(cipher))
    [revealed] = render_trail(records, Reader(cipher, reveal=True))
    keys.erase("acme", "cust-7", "human:dpo")
    [erased] = render_trail(records, Reader(cipher, reveal=True))

    assert "to_address=⟨sealed⟩ body=⟨sealed⟩" in marked and marked == sealed
    assert f'to_address={MAIL} body="secret body"' in revealed
    assert "to_address=⟨erased⟩ body=⟨erased⟩" in erased
    assert all(PREFIX not in line for line in (marked, revealed, erased))


class Record:
    """The part of a Kafka message a JSON-lines sink reads."""

    def topic(self) -> str:
        return "events"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 1

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)


def test_a_json_lines_file_keeps_no_plaintext_whose_read_could_not_be_recorded(
        keys: SqliteKeyStore, tmp_path: Path) -> None:
    cipher = FieldCipher(keys)
    recorded: list[Any] = []
    path = tmp_path / "out.jsonl"
    sink = JsonLinesSink(path, Reader(cipher, reveal=True), recorded.extend)
    sink.write(Record(), sealed_email(cipher))  # type: ignore[arg-type]
    sink.flush()
    assert [d.subject for d in recorded] == ["cust-7"] and MAIL in path.read_text()
    kept = path.stat().st_size

    def refuse(_reads: object) -> None:
        raise OSError("the audit intake is down")

    failing = JsonLinesSink(path, Reader(cipher, reveal=True), refuse)
    failing.write(Record(), sealed_email(cipher, "cust-8"))  # type: ignore[arg-type]
    with pytest.raises(OSError):
        failing.close()
    assert path.stat().st_size == kept


def test_a_json_lines_file_for_people_marks_sealed_values(keys: SqliteKeyStore, tmp_path: Path) -> None:
    cipher = FieldCipher(keys)
    sink = JsonLinesSink(tmp_path / "out.jsonl", Reader(cipher))
    sink.write(Record(), sealed_email(cipher))  # type: ignore[arg-type]
    sink.close()
    [line] = (tmp_path / "out.jsonl").read_text().splitlines()
    assert json.loads(line)["event"]["payload"]["to_address"] == SEALED and PREFIX not in line
