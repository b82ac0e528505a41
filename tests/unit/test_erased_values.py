"""Values under erased keys, as projections and replays write them: found by key id, never opened."""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import cast

import pytest

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from support_desk.messages import EmailQueued, SendEmail
from keel.domain.outcomes import to_events
from keel.trust.erased import Erased, Erasures
from keel.trust.fields import ERASED, PREFIX, FieldCipher
from keel.trust.keystore import MasterKey
from keel.trust.keystore_sqlite import SqliteKeyStore
from tests.helpers import command

CODEC = EnvelopeCodec()


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[SqliteKeyStore]:
    with SqliteKeyStore(tmp_path / "keys.db", MasterKey(os.urandom(32))) as store:
        yield store


def sealed_email(cipher: FieldCipher, subject: str) -> Envelope:
    cmd = command("acme", "sub-1", SendEmail(to_address=f"{subject}@example.com", template="t", body="hi"),
                  on_behalf_of=subject)
    [event] = to_events(cmd, [EmailQueued(to_address=f"{subject}@example.com", template="t", body="hi")],
                        version=0, now=cmd.occurred_at)
    return cipher.seal(event)


class CountingTombstones:
    """A key store that says ``erased`` are erased, and records what it was asked."""

    def __init__(self, erased: set[str]) -> None:
        self.erased_ids = erased
        self.asked: list[set[str]] = []

    def erased(self, key_ids: Collection[str]) -> frozenset[str]:
        self.asked.append(set(key_ids))
        return frozenset(set(key_ids) & self.erased_ids)


def test_only_values_under_an_erased_key_read_as_erased_and_the_rest_keep_their_ciphertext(
        keys: SqliteKeyStore) -> None:
    cipher = FieldCipher(keys)
    gone, kept = sealed_email(cipher, "cust-gone"), sealed_email(cipher, "cust-kept")
    keys.erase("acme", "cust-gone", "human:dpo")

    erased = Erasures(keys).among([CODEC.encode(gone), CODEC.encode(kept)])

    assert erased.envelope(gone).payload == cipher.open(gone).payload  # as opening it would read
    opened = cast(EmailQueued, erased.envelope(gone).payload)
    assert (opened.to_address, opened.template) == (ERASED, "t")
    assert erased.envelope(kept) is kept
    gone_mail, kept_mail = cast(EmailQueued, gone.payload), cast(EmailQueued, kept.payload)
    row = json.dumps({"body": gone_mail.body, "other": kept_mail.body}, ensure_ascii=False)
    assert json.loads(erased.text(row)) == {"body": ERASED, "other": kept_mail.body}


def test_the_key_store_is_asked_once_per_batch_about_keys_not_known_erased() -> None:
    store = CountingTombstones({"a" * 32})
    erasures = Erasures(store)
    batch: list[bytes | str] = [f"{PREFIX}{'a' * 32}:AAAA".encode(), f'{{"x":"{PREFIX}{"b" * 32}:BBBB"}}',
                                "no sealed value"]

    first = erasures.among(batch)
    store.erased_ids.add("b" * 32)  # erased after the first batch
    second = erasures.among(batch)

    assert (first.key_ids, second.key_ids) == (frozenset({"a" * 32}), frozenset({"a" * 32, "b" * 32}))
    assert store.asked == [{"a" * 32, "b" * 32}, {"b" * 32}]  # an erased key stays erased
    assert erasures.among([b"plain"]) == Erased() and len(store.asked) == 2


def test_without_a_key_store_or_an_erased_key_nothing_changes() -> None:
    sealed = f"{PREFIX}{'a' * 32}:AAAA"
    assert Erasures(None).among([sealed]) == Erased()
    assert Erased().text(sealed) == sealed
    assert Erased().sql("toJSONString(e.payload)") == "toJSONString(e.payload)"
    assert Erased(frozenset({"a" * 32})).sql("p") == (
        f"replaceRegexpAll(p, '{PREFIX}(?:{'a' * 32}):[A-Za-z0-9_=-]+', '{ERASED}')")
