"""The processor seals its events' personal fields, and creates a batch's new subjects' keys together."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import pytest

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.processor.worker import CommandProcessor
from keel.sdk.producer import CommandProducer
from keel.trust.codec import SealingCodec
from keel.trust.fields import PREFIX, FieldCipher
from keel.trust.keystore import MasterKey
from support_desk.messages import EmailQueued, SendEmail
from tests.helpers import CountingKeyStore, command, start

pytestmark = pytest.mark.integration


def test_a_batchs_new_subjects_get_their_keys_in_a_few_statements_and_every_email_is_sealed(
        settings: Settings, tmp_path: Path) -> None:
    subjects = [f"cust-{n}" for n in range(60)]
    # Sent unsealed, as a producer without the key store sends them: the processor meets each
    # subject first when it seals the subject's events.
    with CommandProducer(settings, codec=EnvelopeCodec()) as producer:
        for subject in subjects:
            producer.send(command("acme", f"sub-{subject}", start(), on_behalf_of=subject))
            producer.send(command("acme", f"sub-{subject}", SendEmail(to_address=f"{subject}@example.com",
                                                                      template="welcome"), on_behalf_of=subject))
    with CountingKeyStore(tmp_path / "keys.db", MasterKey(os.urandom(32))) as keys:
        codec = SealingCodec(FieldCipher(keys))
        processor = CommandProcessor(settings, instance_id="sealing", codec=codec)
        try:
            stats = processor.run_until_caught_up()
        finally:
            processor.close()
        assert stats.commands == 2 * len(subjects)
        # A read and an insert per batch's tenant, not a read and a durable insert per subject (120).
        assert keys.statements <= 2 * stats.batches
        records = [m.value() or b"" for m in read_to_end(settings, topic_name(settings, Topic.EVENTS))]
        emails = [r for r in records if EnvelopeCodec().read(r)["type"] == "EmailQueued"]
        assert all(EnvelopeCodec().read(r)["payload"]["to_address"].startswith(PREFIX) for r in emails)
        opened = sorted(cast(EmailQueued, codec.decode(r).payload).to_address for r in emails)
        assert opened == sorted(f"{subject}@example.com" for subject in subjects)
