"""The native envelope builder builds exactly what pydantic builds, or defers to it: never more.

``keel_avro.EnvelopeBuilder`` replaces pydantic's validation of decoded envelopes in the
processor's hot path, and of requests' envelopes in the gateway's. Whatever record it is given, it must return the envelope pydantic would
return (same values, same types, same fields set) or ``None``, and ``None`` whenever pydantic
refuses the record, so errors always come from pydantic.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pydantic
import pytest
from fastavro import schemaless_writer
from fastavro.utils import generate_many

from keel.contracts.catalog import load_catalog
from keel.contracts.codec import (AVRO_CORE, ENVELOPE_BUILDER, MAGIC, NATIVE_ENVELOPE_RULES, EnvelopeCodec,
                                  envelope_rules)
from keel.domain.envelope import ActorKind, Envelope
from keel.domain.messages import payload_class
from keel.domain.outcomes import to_events
from keel.domain.parsing import parse_envelope
from support_desk.messages import RefundIssued
from tests.helpers import command, refund

pytestmark = pytest.mark.skipif(AVRO_CORE != "native", reason="the builder is part of the native core (make setup builds it)")

CODEC = EnvelopeCodec()
_S = type("_S", (str,), {})  # a str subclass: pydantic accepts it as a str, the builder defers


def reference_records() -> list[dict[str, Any]]:
    """Decoded records of commands and events as the processor reads them, delegation and sealing-free."""
    cmd = command("acme", "sub-1", refund(5), on_behalf_of="cust-7", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    events = to_events(cmd, [RefundIssued(amount_cents=5, currency="EUR", reason="test")], version=3,
                       now=cmd.occurred_at)
    return [CODEC.read(CODEC.encode(envelope)) for envelope in (cmd, command("globex", "s", refund(1)), *events)]


def built_and_validated(record: dict[str, Any]) -> tuple[Envelope | None, Envelope | None]:
    """What the builder and pydantic make of ``record`` (whose payload is already a model)."""
    assert ENVELOPE_BUILDER is not None
    built = ENVELOPE_BUILDER(record, record["payload"])
    try:
        validated: Envelope | None = Envelope.__pydantic_validator__.validate_python(record)
    except pydantic.ValidationError:
        validated = None
    return built, validated


def assert_same_or_deferred(record: dict[str, Any]) -> bool:
    """The builder made pydantic's envelope (True) or deferred (False); it never accepts what pydantic refuses."""
    built, validated = built_and_validated(record)
    if built is None:
        return False
    assert validated is not None, f"the builder accepted what pydantic refuses: {record}"
    assert type(built) is Envelope and built == validated and repr(built) == repr(validated)
    assert [type(v) for v in built.__dict__.values()] == [type(v) for v in validated.__dict__.values()]
    assert list(built.__dict__) == list(validated.__dict__)
    for mine, theirs in [(built, validated), (built.actor, validated.actor), (built.authority, validated.authority),
                         *zip(built.delegation, validated.delegation)]:
        assert mine.__pydantic_fields_set__ == theirs.__pydantic_fields_set__
        assert (mine.__pydantic_extra__, mine.__pydantic_private__) == (theirs.__pydantic_extra__, None)
    assert hash(built) == hash(validated) and built.model_dump() == validated.model_dump()
    return True


def with_payload(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its payload validated, as ``parse_envelope`` hands it to the builder."""
    return {**record, "payload": payload_class(record["type"]).__pydantic_validator__.validate_python(record["payload"])}


def test_the_rules_the_builder_implements_are_the_models_rules() -> None:
    digest = hashlib.sha256(envelope_rules().encode()).hexdigest()[:16]
    assert digest == NATIVE_ENVELOPE_RULES, (
        "the envelope models changed: check native/keel-avro/src/envelope.rs against them, "
        f"then set NATIVE_ENVELOPE_RULES to {digest!r}")
    assert ENVELOPE_BUILDER is not None


def test_decoded_commands_and_events_are_built_as_pydantic_builds_them() -> None:
    for record in reference_records():
        assert assert_same_or_deferred(with_payload(record))
        assert parse_envelope(record, builder=ENVELOPE_BUILDER) == parse_envelope(record)


def _actor(kind: Any = "agent", id: Any = "bot") -> dict[str, Any]:
    return {"kind": kind, "id": id}


MUTATIONS: list[tuple[str, Callable[[dict[str, Any]], Any], bool]] = [
    # (what, change, the builder must build it)
    ("a 128-character id", lambda r: r.update(tenant_id="a" * 128, aggregate_id="b" * 128), True),
    ("ids of every allowed character", lambda r: r.update(tenant_id="A0._:@-z", aggregate_id="9-a"), True),
    ("200 characters on behalf of, of two bytes each", lambda r: r.update(on_behalf_of="é" * 200), True),
    ("a 128-character traceparent", lambda r: r.update(traceparent="t" * 128), True),
    ("delegated, a 1,000-character reason", lambda r: r.update(delegation=[
        {"actor": _actor("human", "jane"), "reason": "r" * 1000}, {"actor": _actor("service", "s"), "reason": None}]),
     True),
    ("the lowest versions", lambda r: r.update(expected_version=0, version=1, schema_version=1), True),
    ("an authority", lambda r: r.update(authority={**r["authority"], "role": "support", "approval_id": "a-1"}), True),
    ("an empty id", lambda r: r.update(tenant_id=""), False),
    ("a 129-character id", lambda r: r.update(aggregate_id="a" * 129), False),
    ("a slash in an id", lambda r: r.update(tenant_id="acme/x"), False),
    ("an id starting with a dash", lambda r: r.update(aggregate_id="-x"), False),
    ("an id ending in a newline", lambda r: r.update(tenant_id="acme\n"), False),
    ("a non-ASCII id", lambda r: r.update(tenant_id="acmé"), False),
    ("a space in an actor id", lambda r: r.update(actor=_actor(id="a b")), False),
    ("a lone surrogate in an id", lambda r: r.update(tenant_id="a\ud800"), False),
    ("an id of a str subclass", lambda r: r.update(tenant_id=_S("acme")), False),
    ("an int id", lambda r: r.update(tenant_id=5), False),
    ("an unknown actor kind", lambda r: r.update(actor=_actor(kind="robot")), False),
    ("an actor kind given as the enum", lambda r: r.update(actor=_actor(kind=ActorKind.AGENT)), False),
    ("an actor without id", lambda r: r.update(actor={"kind": "agent"}), False),
    ("an actor with more", lambda r: r.update(actor={**_actor(), "name": "x"}), False),
    ("an actor as text", lambda r: r.update(actor="agent:bot"), False),
    ("a 1,001-character reason", lambda r: r.update(delegation=[{"actor": _actor(), "reason": "r" * 1001}]), False),
    ("a link without its reason", lambda r: r.update(delegation=[{"actor": _actor()}]), True),
    ("a delegation tuple", lambda r: r.update(delegation=({"actor": _actor(), "reason": None},)), False),
    ("a link's bad actor", lambda r: r.update(delegation=[{"actor": _actor(id="/"), "reason": None}]), False),
    ("201 characters on behalf of", lambda r: r.update(on_behalf_of="x" * 201), False),
    ("a number on behalf of", lambda r: r.update(on_behalf_of=7), False),
    ("a 129-character traceparent", lambda r: r.update(traceparent="t" * 129), False),
    ("an authority with more", lambda r: r.update(authority={**r["authority"], "scope": "x"}), False),
    ("an authority with less", lambda r: r.update(authority={"role": "x"}), True),
    ("an authority of numbers", lambda r: r.update(authority={**r["authority"], "grant": 5}), False),
    ("schema version 0", lambda r: r.update(schema_version=0), False),
    ("schema version True", lambda r: r.update(schema_version=True), False),
    ("a schema version past 64 bits", lambda r: r.update(schema_version=2**70), False),
    ("expected version -1", lambda r: r.update(expected_version=-1), False),
    ("version 0", lambda r: r.update(version=0), False),
    ("version as text", lambda r: r.update(version="3"), False),
    ("a causation id as text", lambda r: r.update(causation_id=str(uuid.uuid4())), True),
    ("ids as upper-case text", lambda r: r.update(id=str(uuid.uuid4()).upper(), correlation_id=str(uuid.uuid4())),
     True),
    ("an id as 32 hex digits", lambda r: r.update(id=uuid.uuid4().hex), False),
    ("an id in braces", lambda r: r.update(id="{%s}" % uuid.uuid4()), False),
    ("an id as a URN", lambda r: r.update(id=uuid.uuid4().urn), False),
    ("an id of 36 characters that are not hex", lambda r: r.update(id="g" * 8 + "-0000-0000-0000-" + "0" * 12), False),
    ("an id with the hyphens moved", lambda r: r.update(id="0" * 9 + "-000-0000-0000-" + "0" * 12), False),
    ("an id of text with spaces", lambda r: r.update(id=" %s" % str(uuid.uuid4())[1:]), False),
    ("a correlation id that is no uuid", lambda r: r.update(correlation_id="x"), False),
    ("an id as bytes", lambda r: r.update(id=uuid.uuid4().bytes), False),
    ("a naive time", lambda r: r.update(occurred_at=datetime(2026, 1, 1)), False),
    ("a time at +02:00", lambda r: r.update(occurred_at=datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2)))), False),
    ("a time as text", lambda r: r.update(occurred_at="2026-01-01T00:00:00Z"), False),
    ("a payload of another type", lambda r: r.update(type="StartSubscription"), False),
    ("a field more", lambda r: r.update(extra="x"), False),
    ("no traceparent", lambda r: r.pop("traceparent"), True),
    ("every optional field omitted", lambda r: [r.pop(name) for name in (
        "delegation", "on_behalf_of", "authority", "schema_version", "expected_version", "version", "causation_id",
        "traceparent")], True),
    ("the default authority object", lambda r: r.update(authority=Envelope.model_fields["authority"].default), True),
    ("no correlation id", lambda r: r.pop("correlation_id"), False),
    ("no time", lambda r: r.pop("occurred_at"), False),
    ("no actor", lambda r: r.pop("actor"), False),
    ("no type", lambda r: r.pop("type"), False),
    ("an actor of more and less", lambda r: r.update(actor={"kind": "agent", "name": "x"}), False),
    ("a link of its reason only", lambda r: r.update(delegation=[{"reason": "x"}]), False),
]


@pytest.mark.parametrize("what, change, builds", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_changed_record_is_built_as_pydantic_builds_it_or_left_to_pydantic(
        what: str, change: Callable[[dict[str, Any]], Any], builds: bool) -> None:
    record = with_payload(reference_records()[0])
    change(record)
    assert assert_same_or_deferred(record) is builds, what


def request_mapping(**fields: Any) -> dict[str, Any]:
    """A mapping as the gateway's intake makes of a request body: ids as text, fields omitted."""
    command_id = str(uuid.uuid4())
    return {"correlation_id": command_id, "occurred_at": datetime.now(UTC), "id": command_id, "tenant_id": "acme",
            "actor": _actor(), "type": "IssueRefund", "aggregate_id": "sub-1",
            "payload": {"amount_cents": 5, "currency": "EUR", "reason": "r"}, **fields}


REQUESTS: list[tuple[str, dict[str, Any], bool]] = [
    ("the fewest fields", {}, True),
    ("delegated, on behalf of, with a role", {
        "on_behalf_of": "cust-1", "authority": {"role": "support-agent"},
        "delegation": [{"actor": {"kind": "human", "id": "jane.lead"}, "reason": "the customer asked"}]}, True),
    ("every field", {"expected_version": 3, "schema_version": 1, "causation_id": str(uuid.uuid4()),
                     "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "version": None,
                     "authority": {"role": "r", "grant": "g", "policy_rule": None}, "delegation": []}, True),
    ("a time as text", {"occurred_at": "2026-01-01T00:00:00Z"}, False),
    ("a null delegation", {"delegation": None}, False),
    ("a null authority", {"authority": None}, False),
    ("a schema version of 2", {"schema_version": 2}, True),
]


@pytest.mark.parametrize("what, fields, builds", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_a_requests_mapping_is_built_as_pydantic_builds_it_or_left_to_pydantic(
        what: str, fields: dict[str, Any], builds: bool) -> None:
    assert assert_same_or_deferred(with_payload(request_mapping(**fields))) is builds, what


def test_the_utc_singleton_is_what_a_zero_offset_makes() -> None:
    """The builder accepts only the UTC object itself; a zero offset made another way is that object."""
    record = with_payload(reference_records()[0])
    record["occurred_at"] = datetime(2026, 1, 1, tzinfo=timezone(timedelta(0)))
    assert record["occurred_at"].tzinfo is UTC and assert_same_or_deferred(record)


def test_random_records_of_every_type_are_built_as_pydantic_builds_them_or_left_to_it() -> None:
    """Records of every type and version of the catalog with random values, read as the processor reads them."""
    built = 0
    for schema in load_catalog().by_fingerprint.values():
        for record in generate_many(schema.parsed, 20):
            record["type"] = schema.message_type  # random elsewhere: only the type must name a payload class
            buffer = io.BytesIO(MAGIC + schema.fingerprint)
            buffer.seek(0, io.SEEK_END)
            schemaless_writer(buffer, schema.parsed, record)
            read = CODEC.read(buffer.getvalue())
            try:
                read = with_payload(read)
            except (pydantic.ValidationError, KeyError, TypeError):
                continue
            built += assert_same_or_deferred(read)
            read.update(tenant_id="acme", aggregate_id="a-1", actor=_actor(), delegation=[], on_behalf_of=None,
                        traceparent=None, schema_version=max(1, read["schema_version"]), expected_version=None,
                        version=None)  # random ids rarely pass: with these, the rest must be built
            assert assert_same_or_deferred(read), read
            built += 1
    assert built > 100


def test_a_core_built_before_this_code_leaves_every_envelope_to_pydantic(monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """An installed core whose builder takes other arguments (built from older sources) is not used."""
    import types

    from keel.contracts import codec

    def older_builder(*args: Any) -> Any:
        raise TypeError(f"EnvelopeBuilder.__new__() takes 9 positional arguments but {len(args)} were given")

    monkeypatch.setattr(codec, "_NATIVE", types.SimpleNamespace(EnvelopeBuilder=older_builder))
    assert codec._envelope_builder() is None
    assert "make setup" in caplog.text
