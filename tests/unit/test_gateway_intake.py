"""The gateway's intake, without I/O: the key decides tenant and actor, errors name the field."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind
from keel.domain.principal import Principal
from keel.errors import KeelError
from keel.gateway.intake import admit, fingerprint

CODEC = EnvelopeCodec()
BOT = Principal(tenant_id="acme", actor=Actor(kind=ActorKind.AGENT, id="bot"), roles=frozenset({"agent"}))
REFUND = {"type": "IssueRefund", "aggregate_id": "sub-1",
          "payload": {"amount_cents": 5, "currency": "EUR", "reason": "r"}}


def raw(**fields: object) -> bytes:
    return json.dumps({**REFUND, **fields}).encode()


def test_tenant_and_actor_are_filled_from_the_principal() -> None:
    envelope, row = admit(raw(), BOT, CODEC)
    assert (envelope.tenant_id, envelope.actor) == ("acme", BOT.actor)
    assert row.key == "acme/sub-1" and row.actor == "agent:bot"
    assert CODEC.decode(row.value) == envelope


def test_the_request_hash_ignores_key_order_but_not_content() -> None:
    command_id = str(uuid.uuid4())
    a = admit(json.dumps({"id": command_id, **REFUND}).encode(), BOT, CODEC)[1]
    b = admit(json.dumps(dict(reversed(list({"id": command_id, **REFUND}.items())))).encode(), BOT, CODEC)[1]
    c = admit(raw(id=command_id, aggregate_id="sub-2"), BOT, CODEC)[1]
    assert a.request_hash == b.request_hash != c.request_hash


def test_an_integral_float_is_the_integer_and_keeps_its_own_fingerprint() -> None:
    """As in JSON Schema, 5.0 is the integer 5; the request is still told apart by its bytes' form."""
    command_id = str(uuid.uuid4())
    whole, row = admit(raw(id=command_id, payload={"amount_cents": 5.0, "currency": "EUR", "reason": "r"}), BOT, CODEC)
    assert type(whole.payload.amount_cents) is int and whole.payload.amount_cents == 5  # type: ignore[attr-defined]
    assert row.request_hash != admit(raw(id=command_id), BOT, CODEC)[1].request_hash
    with pytest.raises(KeelError) as caught:
        admit(raw(payload={"amount_cents": 5.5, "currency": "EUR", "reason": "r"}), BOT, CODEC)
    assert (caught.value.code, caught.value.field) == ("schema_violation", "payload.amount_cents")


def canonical_hash(document: Any) -> str:
    """What the fingerprint has always been: the sha256 of json's sorted, compact form."""
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


TEXT = st.text(st.characters(exclude_categories=()), max_size=12)  # control characters and lone surrogates too
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20)


@settings(max_examples=2000, deadline=None, database=None)
@given(document=st.dictionaries(TEXT, JSON, max_size=6))
def test_the_fingerprint_is_the_sha256_of_jsons_canonical_form_whatever_the_body(document: dict[str, Any]) -> None:
    assert fingerprint(document) == canonical_hash(document)


@pytest.mark.parametrize("value", ["café", "\x7f", "tab\tnew\nline\x00\x1f", "\ud800", 1e16, 1.5e-07, 0.1, 2**64, -2**63,
                                   [1.0], {"é": 1}, {"b": 1, "a": 2, "A": 3}])
def test_the_fingerprint_takes_jsons_form_where_orjson_would_write_other_bytes(value: object) -> None:
    assert fingerprint({"payload": value}) == canonical_hash({"payload": value})


@pytest.mark.parametrize(("body", "code", "field"), [
    (b"{", "malformed_json", ""),
    (b'{"a": NaN}', "malformed_json", ""),
    (b"[" * 100_000, "malformed_json", ""),
    (b"\xff\xfe\x00", "malformed_json", ""),
    (b'"text"', "schema_violation", ""),
    (raw(tenant_id="globex"), "wrong_tenant", "tenant_id"),
    (raw(actor={"kind": "human", "id": "bot"}), "wrong_actor", "actor"),
    (raw(type="Nope"), "unknown_type", "type"),
    (raw(type="SubscriptionCancelled", payload={"reason": "x"}), "not_a_command", "type"),
    (raw(payload={"amount_cents": 5, "currency": "euro", "reason": "r"}), "schema_violation", "payload.currency"),
    (raw(aggregate_id="a/b"), "schema_violation", "aggregate_id"),
    (raw(schema_version=2), "unknown_schema", "schema_version"),
    (raw(payload={"amount_cents": 5, "currency": "EUR", "reason": "\ud800"}), "schema_violation", "payload.reason"),
    # Integers past 64 bits, which the fast JSON parser reads as floats, are still refused.
    (raw(payload={"amount_cents": 10**30, "currency": "EUR", "reason": "r"}), "schema_violation",
     "payload.amount_cents"),
    (raw(payload={"amount_cents": 2**64 - 1, "currency": "EUR", "reason": "r"}), "schema_violation",
     "payload.amount_cents"),
])
def test_bad_bodies_are_refused_with_a_code_and_field(body: bytes, code: str, field: str) -> None:
    with pytest.raises(KeelError) as caught:
        admit(body, BOT, CODEC)
    assert (caught.value.code, caught.value.field) == (code, field)


def test_a_body_created_before_the_dedupe_window_is_refused() -> None:
    month = 30 * 24 * 3600.0
    old = (datetime.now(UTC) - timedelta(days=31)).isoformat()
    recent = (datetime.now(UTC) - timedelta(days=29)).isoformat()
    with pytest.raises(KeelError) as caught:
        admit(raw(occurred_at=old), BOT, CODEC, max_age_s=month)
    assert (caught.value.code, caught.value.field) == ("beyond_dedupe_window", "occurred_at")
    assert admit(raw(occurred_at=recent), BOT, CODEC, max_age_s=month)[0].occurred_at.isoformat() == recent
    assert admit(raw(occurred_at=old), BOT, CODEC)[0].occurred_at.isoformat() == old  # 0: no limit
