"""What the processor produces for a decision: each event to the events topic and the audit intake, then controls;
each events-topic record names its type, the command it is about and, when it has one, its effect's provider."""

from __future__ import annotations

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.governance.pipeline import Decision
from support_desk.messages import RefundIssued
from keel.domain.outcomes import to_events
from keel.processor.worker import Outputs, decided_records
from tests.helpers import command, refund


def test_each_event_goes_to_its_aggregate_partition_and_to_the_tenant_keyed_audit_intake() -> None:
    codec, outputs = EnvelopeCodec(), Outputs.of(Settings(topic_prefix="unit"))
    cmd = command("acme", "sub-1", refund(5))
    [event] = to_events(cmd, [RefundIssued(amount_cents=5, currency="EUR", reason="test")], version=1,
                        now=cmd.occurred_at)
    records: list = []
    decided_records(Decision([event], [("acme/kill-agent/bot", b"{}")], "IssueRefund"), codec, outputs, b"acme/sub-1",
                    2, records)
    value = codec.encode(event)
    headers = [("keel-type", b"RefundIssued"), ("keel-command-type", b"IssueRefund"), ("keel-effect", b"payments")]
    assert records == [
        (outputs.events, value, b"acme/sub-1", 2, headers),
        (outputs.audit_intake, value, b"acme", -1, None),  # the chainer reads the value alone
        (outputs.controls, b"{}", b"acme/kill-agent/bot", -1, None),
    ]
