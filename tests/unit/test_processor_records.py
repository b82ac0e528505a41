"""What the processor produces for a decision: each event to the events topic and its tenant's audit intake
(bundled per produce chunk), then controls; each events-topic record names its type, the command it is about
and, when it has one, its effect's provider."""

from __future__ import annotations

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.governance.pipeline import Decision
from support_desk.messages import RefundIssued
from keel.domain.outcomes import to_events
from keel.processor.worker import Chunk, Outputs, decided_records
from keel.trust.entries import BUNDLE_MAGIC, entries_from_intake
from tests.helpers import command, refund


def test_each_event_goes_to_its_aggregate_partition_and_to_the_tenant_keyed_audit_intake() -> None:
    codec, outputs = EnvelopeCodec(), Outputs.of(Settings(topic_prefix="unit"))
    cmd = command("acme", "sub-1", refund(5))
    [event] = to_events(cmd, [RefundIssued(amount_cents=5, currency="EUR", reason="test")], version=1,
                        now=cmd.occurred_at)
    chunk = Chunk()
    decided_records(Decision([event], [("acme/kill-agent/bot", b"{}")], "IssueRefund"), codec, outputs, b"acme/sub-1",
                    2, chunk)
    value = codec.encode(event)
    headers = [("keel-type", b"RefundIssued"), ("keel-command-type", b"IssueRefund"), ("keel-effect", b"payments")]
    assert chunk.take(outputs.audit_intake) == [
        (outputs.events, value, b"acme/sub-1", 2, headers),
        (outputs.controls, b"{}", b"acme/kill-agent/bot", -1, None),
        (outputs.audit_intake, value, b"acme", -1, None),  # alone in its chunk: the event's own bytes, no headers
    ]
    assert chunk.take(outputs.audit_intake) == []  # taken once


def test_a_chunks_events_go_to_the_audit_intake_as_one_bundle_per_tenant_in_decision_order() -> None:
    codec, outputs, chunk = EnvelopeCodec(), Outputs.of(Settings(topic_prefix="unit")), Chunk()
    decided: dict[str, list[bytes]] = {"acme": [], "globex": []}
    for step in range(6):
        tenant = ("acme", "globex")[step % 2]
        cmd = command(tenant, f"sub-{step}", refund(5 + step))
        [event] = to_events(cmd, [RefundIssued(amount_cents=5 + step, currency="EUR", reason="test")], version=1,
                            now=cmd.occurred_at)
        decided_records(Decision([event], origin_type="IssueRefund"), codec, outputs, cmd.key.encode(), 0, chunk)
        decided[tenant].append(codec.encode(event))
    intake = [(key, value) for topic, value, key, _, _ in chunk.take(outputs.audit_intake)
              if topic == outputs.audit_intake]
    assert [key for key, _ in intake] == [b"acme", b"globex"]
    for key, value in intake:
        assert key is not None and value is not None and value.startswith(BUNDLE_MAGIC)
        assert [entry.body for entry in entries_from_intake(value, key.decode())] == decided[key.decode()]
