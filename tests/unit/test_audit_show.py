"""The readable audit trail marks what undid what."""

from __future__ import annotations

from keel.trust.record import AuditEntry, AuditRecord
from keel.trust.show import render_trail


def record(seq: int, type_: str) -> AuditRecord:
    entry = AuditEntry(tenant="acme", kind="event", entry_id=f"e{seq}", type=type_, aggregate_id="sub-1",
                       version=seq, actor="human:jane.lead", on_behalf_of="cust-1", authority='{"role":"admin"}',
                       delegation="[]", causation_id=None, correlation_id="c1", occurred_at_us=0,
                       schema_version=1, body=b"")
    return AuditRecord(seq=seq, prev_hash=b"\0" * 32, entry=entry, hash=b"\1" * 32, raw=b"")


def test_compensations_and_erasures_are_marked_as_undoing_and_actions_are_not() -> None:
    lines = render_trail([record(1, "RefundIssued"), record(2, "RefundReversed"),
                          record(3, "SubscriptionCancelled"), record(4, "SubscriptionReactivated")])
    assert ["undoes earlier actions" in line for line in lines] == [False, True, False, True]
