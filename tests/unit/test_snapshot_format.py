"""Snapshot records: typed round trips of every example aggregate, and refusals of what cannot be read."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pytest

from deploys.service import INITIAL as NO_SERVICE, Promotion
from keel.contracts.codec import EnvelopeCodec
from keel.domain.aggregate import AggregateState
from keel.domain.effects import EffectMark
from keel.domain.events import ApprovalKind
from keel.domain.governance.approvals import Parked
from keel.domains import EmailAddress, PersonalText
from keel.domains.registry import build, current
from keel.processor.snapshot_format import PART_SIZE, SnapshotError, SnapshotFormat, part_key
from keel.processor.state import minutes_array
from support_desk.subscription import INITIAL as NO_SUBSCRIPTION, Status
from tests.helpers import command, refund

GEN = b"\x01" * 8


@pytest.fixture(scope="module")
def snapshot_format() -> SnapshotFormat:
    return SnapshotFormat(current(), EnvelopeCodec())


def read(snapshot_format: SnapshotFormat, key: bytes, records: list[tuple[bytes, bytes]]) -> bytes:
    return snapshot_format.payload(key, dict[bytes, bytes | None](records))[1]


def test_every_part_of_an_aggregate_comes_back_equal(snapshot_format: SnapshotFormat) -> None:
    parked = command("acme", "sub-1", refund(200_000))
    subscription = AggregateState(
        version=7, aggregate="subscription",
        domain=replace(NO_SUBSCRIPTION, status=Status.ACTIVE, customer_id="c-1", currency="EUR", paid_cents=5000,
                       refunds={uuid.uuid4(): 100, uuid.uuid4(): 250}),
        pending={parked.id: Parked(parked, ApprovalKind.APPROVAL, "big-refunds", "v3",
                                   datetime(2026, 12, 5, 10, 30, 0, 123456, UTC))},
        effects={uuid.uuid4(): EffectMark(uuid.uuid4(), 2, False)})
    service = AggregateState(version=3, aggregate="service", domain=replace(
        NO_SERVICE, previews=frozenset({"r1", "r2"}), release="r2", percent=40,
        promotions=(Promotion(uuid.uuid4(), 0), Promotion(uuid.uuid4(), 10))))
    keel_only = AggregateState(version=1)

    for state in (subscription, service, keel_only):
        payload = snapshot_format.encode_aggregate(state)
        assert snapshot_format.decode_aggregate(read(snapshot_format, b"a/k", snapshot_format.records(
            b"a/k", payload, GEN))) == state


def test_a_long_payload_is_split_into_parts_that_join_again(snapshot_format: SnapshotFormat) -> None:
    payload = bytes(range(256)) * (PART_SIZE // 100)
    records = snapshot_format.records(b"a/big", payload, GEN)

    assert [key for key, _ in records] == [b"a/big", part_key(b"a/big", 1), part_key(b"a/big", 2)]
    assert all(len(value) < 1_000_000 for _, value in records)
    assert read(snapshot_format, b"a/big", records) == payload
    with pytest.raises(SnapshotError, match="part 2"):
        read(snapshot_format, b"a/big", records[:2])


def test_packed_ids_come_back_equal(snapshot_format: SnapshotFormat) -> None:
    ids = b"".join(uuid.uuid4().bytes for _ in range(3))
    minutes = minutes_array()
    minutes.extend([29_000_000, 29_000_001, 29_000_001])

    assert snapshot_format.decode_ids(snapshot_format.encode_ids(ids, minutes)) == (ids, minutes)
    with pytest.raises(SnapshotError, match="wrong length"):
        snapshot_format.decode_ids(snapshot_format.encode_ids(ids, minutes)[:-1])


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "other format"])
def test_a_damaged_record_is_refused(snapshot_format: SnapshotFormat, damage: str) -> None:
    [(key, value)] = snapshot_format.records(b"a/k", snapshot_format.encode_aggregate(AggregateState(version=1)), GEN)
    damaged = {"flipped byte": value[:-3] + bytes([value[-3] ^ 1]) + value[-2:],
               "truncated": value[:20],
               "other format": value[:2] + bytes([value[2] + 1]) + value[3:]}[damage]

    with pytest.raises(SnapshotError):
        read(snapshot_format, key, [(key, damaged)])


@dataclass(frozen=True)
class Counter:
    count: int = 0


def _evolve(state: Counter, event: object) -> Counter:
    return replace(state, count=state.count + 1)


def test_another_state_schema_or_domain_code_changes_the_fingerprint(snapshot_format: SnapshotFormat) -> None:
    [domain, *others] = current().domains
    subscription = domain.aggregates[0]
    reshaped = replace(domain, aggregates=(replace(subscription, initial=Counter(), evolve=_evolve),))
    elsewhere = replace(domain, home=domain.home.parent.parent / "deploys" / "deploys")

    for changed in (reshaped, elsewhere):
        other = SnapshotFormat(build([changed, *others], check_schemas=False), EnvelopeCodec())
        assert other.fingerprint != snapshot_format.fingerprint
        [(key, value)] = snapshot_format.records(b"m", b"{}", GEN)
        with pytest.raises(SnapshotError, match="other domain code"):
            other.header(value)


def test_a_state_without_a_typed_form_is_refused_up_front() -> None:
    [domain, *others] = current().domains
    untyped = replace(domain, aggregates=(replace(domain.aggregates[0], initial={}),))

    with pytest.raises(SnapshotError, match="not a dataclass") as refused:
        _ = SnapshotFormat(build([untyped, *others], check_schemas=False), EnvelopeCodec()).fingerprint
    assert refused.value.code == "snapshot_state_untyped"


@dataclass(frozen=True)
class _Contact:
    customer_id: str | None = None
    email: EmailAddress | None = None
    notes: tuple[PersonalText, ...] = ()


def test_a_state_that_keeps_personal_fields_gets_no_snapshots() -> None:
    [domain, *others] = current().domains
    personal = replace(domain, aggregates=(replace(domain.aggregates[0], initial=_Contact()),))

    with pytest.raises(SnapshotError, match=r"personal fields in its state \(email, notes\)") as refused:
        _ = SnapshotFormat(build([personal, *others], check_schemas=False), EnvelopeCodec()).fingerprint
    assert refused.value.code == "snapshot_state_personal"
