"""``CommandProducer.send_many`` on the real broker: sealed, in order, one key per subject; a refusal queues nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.errors import ValidationError
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.sdk.producer import CommandProducer
from keel.trust.codec import SealingCodec
from keel.trust.fields import FieldCipher
from keel.trust.keystore import MasterKey
from keel.trust.keystore_sqlite import SqliteKeyStore
from support_desk.messages import SendEmail
from tests.helpers import command, start

pytestmark = pytest.mark.integration
PLAIN = EnvelopeCodec()  # reads the wire as stored: sealed values stay sealed


@pytest.fixture
def codec(tmp_path: Path) -> Iterator[SealingCodec]:
    with SqliteKeyStore(tmp_path / "keys.db", MasterKey(os.urandom(32))) as keys:
        yield SealingCodec(FieldCipher(keys))


def mail(subject: str) -> SendEmail:
    return SendEmail(to_address=f"{subject}@example.com", template="t", body=f"Dear {subject}")


def test_a_batch_arrives_sealed_in_order_under_one_key_per_subject(settings: Settings, codec: SealingCodec) -> None:
    batch = [command("acme", f"sub-{n % 7}", mail(f"cust-{n % 300}"), on_behalf_of=f"cust-{n % 300}")
             for n in range(2_500)]  # three chunks; subjects recur across them
    with CommandProducer(settings, codec=codec) as producer:
        assert producer.send_many(batch) == 2_500
        assert producer.flush() == 2_500
    records = list(read_to_end(settings, topic_name(settings, Topic.COMMANDS)))
    assert b"@example.com" not in b"".join(m.value() or b"" for m in records)
    received = [codec.decode(m.value() or b"") for m in records]
    assert sorted(c.id for c in received) == sorted(c.id for c in batch)
    sent_at = {c.id: n for n, c in enumerate(batch)}
    for aggregate in {c.aggregate_id for c in batch}:  # one key, one partition: the batch's order
        order = [sent_at[c.id] for c in received if c.aggregate_id == aggregate]
        assert order == sorted(order)
    assert all(c.payload == batch[sent_at[c.id]].payload for c in received)
    key_ids: dict[str, set[str]] = {}  # the key id each sealed value names, by subject
    for wire in (PLAIN.decode(m.value() or b"") for m in records):
        key_ids.setdefault(wire.on_behalf_of or "", set()).add(cast(SendEmail, wire.payload).to_address.split(":")[2])
    assert len(key_ids) == 300 and all(len(ids) == 1 for ids in key_ids.values())


def test_a_batch_with_a_refused_command_queues_nothing(settings: Settings, codec: SealingCodec) -> None:
    too_old = datetime.now(UTC) - timedelta(seconds=settings.processor_dedupe_window_s + 60)
    batch = [command("acme", "sub-1", start()), command("acme", "sub-1", start(), occurred_at=too_old)]
    with CommandProducer(settings, codec=codec) as producer:
        with pytest.raises(ValidationError) as caught:
            producer.send_many(batch)
        assert producer.flush() == 0
    assert caught.value.code == "beyond_dedupe_window"
    assert list(read_to_end(settings, topic_name(settings, Topic.COMMANDS), timeout_s=5)) == []
