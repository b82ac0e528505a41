"""Event envelopes derived from a decision: the ids are RFC 4122 version-5 UUIDs of the command id and
index, and an event equals what validating the same fields would build."""

from __future__ import annotations

import hashlib
import uuid

from keel.domain.envelope import Envelope
from keel.domain.outcomes import _EVENT_NAMESPACE, event_id, to_events
from support_desk.messages import RefundIssued
from tests.helpers import command, refund


def test_event_ids_are_the_version_5_uuids_of_the_command_id_and_index() -> None:
    for index in range(64):
        command_id = uuid.uuid4()
        name = _EVENT_NAMESPACE + command_id.bytes + index.to_bytes(4, "big")
        expected = uuid.UUID(bytes=hashlib.sha1(name).digest()[:16], version=5)
        derived = event_id(command_id, index)
        assert (derived, str(derived), derived.version, derived.variant) == (
            expected, str(expected), 5, uuid.RFC_4122)
        assert hash(derived) == hash(expected) and derived.bytes == expected.bytes


def test_a_derived_event_equals_the_validated_envelope_of_its_fields() -> None:
    cmd = command("acme", "sub-1", refund(5))
    [event] = to_events(cmd, [RefundIssued(amount_cents=5, currency="EUR", reason="test")], version=3,
                        now=cmd.occurred_at)
    validated = Envelope.model_validate(event.model_dump())
    assert event == validated
    assert event.model_dump_json() == validated.model_dump_json()
    assert (event.version, event.causation_id, event.id, event.type) == (4, cmd.id, event_id(cmd.id, 0),
                                                                          "RefundIssued")
    assert cmd.version is None and cmd.type == "IssueRefund"  # the command is left as it was


def test_a_derived_event_copies_like_any_envelope() -> None:
    cmd = command("acme", "sub-1", refund(5))
    [event] = to_events(cmd, [RefundIssued(amount_cents=5, currency="EUR", reason="test")], version=0,
                        now=cmd.occurred_at)
    copied = event.model_copy(update={"version": 9})
    assert (copied.version, event.version, copied.id) == (9, 1, event.id)
