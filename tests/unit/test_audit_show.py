"""The readable audit trail: the whole story of a command or subject, and what undid what."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, Authority, Envelope
from keel.domain.events import ApprovalGranted, ApprovalKind, ApprovalRequested
from support_desk.messages import RefundIssued, RefundReversed
from keel.domain.messages import ApproveCommand
from support_desk.messages import ReverseRefund
from keel.domain.outcomes import to_events
from keel.trust.entries import encode_receipt, entry_from_intake
from keel.trust.record import GENESIS, AuditEntry, AuditRecord, parse_record, record_hash, seal_record
from keel.trust.show import render_trail, select_trail
from tests.helpers import command, refund

LEAD = Actor(kind=ActorKind.HUMAN, id="jane.lead")
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


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


def chain(*intake: bytes) -> list[bytes]:
    """Chain intake values as the chainer would (tenant acme)."""
    out, prev = [], GENESIS
    for seq, value in enumerate(intake, start=1):
        raw = seal_record(seq, prev, entry_from_intake(value, "acme"))
        out.append(raw)
        prev = record_hash(raw)
    return out


def story() -> tuple[list[bytes], dict[str, Envelope]]:
    """What the processor publishes for a parked refund, approved by a lead, executed, then undone."""
    codec, session = EnvelopeCodec(), uuid.uuid4()
    big = command("acme", "sub-1", refund(150_000), correlation_id=session)
    other = command("acme", "sub-2", refund(2_000), on_behalf_of="cust-2")
    approve = command("acme", "sub-1", ApproveCommand(command_id=big.id, comment="known customer"), actor=LEAD,
                      on_behalf_of=None)
    undo = command("acme", "sub-1", ReverseRefund(refund_command_id=big.id, reason="disputed"), actor=LEAD,
                   on_behalf_of=None, causation_id=big.id, correlation_id=session)
    rule = Authority(role="support-agent", policy_rule="big-refunds", policy_version="p1")
    events = [
        *to_events(big, [ApprovalRequested(command_id=big.id, command_type=big.type,
                                           approval_kind=ApprovalKind.APPROVAL, policy_rule="big-refunds",
                                           policy_version="p1", expires_at=NOW + timedelta(days=1),
                                           command=big.model_dump_json())], version=1, now=NOW, authority=rule),
        *to_events(other, [RefundIssued(amount_cents=2_000, currency="EUR", reason="test")], version=1, now=NOW),
        *to_events(approve, [ApprovalGranted(command_id=big.id, approver="human:jane.lead",
                                             comment="known customer")], version=2, now=NOW,
                   authority=Authority(role="admin")),
        *to_events(approve, [RefundIssued(amount_cents=150_000, currency="EUR", reason="test")], version=3,
                   now=NOW, authority=Authority(role="support-agent", policy_rule="big-refunds",
                                                approval_id=str(approve.id)), origin=big, first_index=1),
        *to_events(undo, [RefundReversed(amount_cents=150_000, currency="EUR", reason="disputed",
                                         reverses=big.id)], version=4, now=NOW, authority=Authority(role="admin")),
    ]
    return chain(*(codec.encode(e) for e in events)), {"big": big, "approve": approve, "undo": undo}


def test_the_trail_of_a_command_follows_its_approval_and_the_compensation_that_names_it() -> None:
    records, cmds = story()
    big, approve = cmds["big"], cmds["approve"]
    trail = select_trail(records, command=str(big.id))
    assert [r.entry.type for r in trail] == ["ApprovalRequested", "ApprovalGranted", "RefundIssued",
                                              "RefundReversed"]
    requested, granted, issued, reversed_ = render_trail(trail)
    assert "policy_rule=big-refunds" in requested and f"command_id={big.id}" in requested
    assert 'human:jane.lead [role=admin] ApprovalGranted sub-1 v3' in granted
    assert f'command_id={big.id} approver=human:jane.lead comment="known customer"' in granted
    assert f"approval_id={approve.id}" in issued and "agent:support-bot on behalf of cust-1" in issued
    assert f"reverses={big.id} reason=disputed <- undoes earlier actions" in reversed_
    for start_from in (approve.id, cmds["undo"].id):  # any command of the story tells all of it
        assert select_trail(records, command=str(start_from)) == trail
    assert select_trail(records, command=str(big.id).upper()) == trail


def test_the_trail_of_a_subject_includes_what_others_did_for_their_commands_and_nothing_else() -> None:
    records, _ = story()
    trail = select_trail(records, subject="cust-1")
    assert [r.entry.type for r in trail] == ["ApprovalRequested", "ApprovalGranted", "RefundIssued",
                                              "RefundReversed"]
    assert [r.entry.on_behalf_of for r in select_trail(records, subject="cust-2")] == ["cust-2"]


def test_receipt_details_are_shown_and_sealed_values_never_are() -> None:
    receipt = encode_receipt(tenant="acme", type="SubjectErased", receipt_id=uuid.uuid4(), actor="human:dpo",
                             on_behalf_of="cust-1", occurred_at=NOW,
                             details={"subject": "cust-1", "reason": "keel-enc:v1:k1:AAAA", "code": "gdpr art 17"})
    [line] = render_trail([parse_record(r) for r in chain(receipt)])
    assert 'SubjectErased reason=⟨sealed⟩ code="gdpr art 17" <- undoes earlier actions' in line
    assert "keel-enc" not in line


def test_an_unmatched_trail_says_so() -> None:
    assert render_trail(select_trail(story()[0], command=str(uuid.uuid4()))) == ["(no audit records match)"]
