"""Schema evolution: a model's Avro record, `freeze`, the start-up check and upcasting on read.

Each test builds a tiny domain in a temporary folder: models made with ``create_model`` (a
type keeps its name across versions) and schema files written as ``freeze`` writes them.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, create_model

from keel.contracts.catalog import Upcaster, load_catalog
from keel.contracts.codec import EnvelopeCodec
from keel.contracts.evolution import (
    IncompatibleSchema,
    SchemaError,
    SchemaProblem,
    freeze,
    keel_owner,
    model_schema,
    owner_of,
    plan_freeze,
    problems,
    render,
    schema_problems,
)
from keel.domain.envelope import Actor, ActorKind, Envelope
from keel.domains import Aggregate, Domain, EmailAddress, Event, PersonalText
from keel.domains.registry import DomainError, build, load, sources
from keel.errors import DecodeError

TYPE = "TicketFiled"


def _model(version: int = 1, **fields: Any) -> type[Event]:
    """The event ``TicketFiled`` with ``fields`` (create_model's ``name=(type, default)`` form)."""
    cls: type[Event] = create_model(TYPE, __base__=Event, **fields)
    cls.schema_version = version
    return cls


def _domain(home: Path, cls: type[Event], upcasters: dict[tuple[str, int], Upcaster] | None = None) -> Domain:
    tickets = Aggregate(name="ticket", initial=0, commands=(), events=(cls,),
                        decide=lambda state, command: [], evolve=lambda state, event: state)
    return Domain(name="tickets", home=home, aggregates=(tickets,), upcasters=upcasters or {})


def _release(home: Path, cls: type[Event], version: int) -> Path:
    """Write ``cls``'s schema as version ``version`` of the type, as ``freeze`` would."""
    path = home / "schemas" / "events" / TYPE / f"v{version}.avsc"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(model_schema(_domain(home, cls), cls)))
    return path


def _only(found: list[SchemaProblem]) -> SchemaProblem:
    assert len(found) == 1, found
    return found[0]


V1 = _model(title=(str, ...))


class Priority(StrEnum):
    LOW = "low"
    HIGH = "high"


def test_model_schema_follows_the_schema_conventions(tmp_path: Path) -> None:
    cls = create_model(
        TYPE, __base__=Event, __doc__="A ticket was filed.\n\n    By a customer.",
        id=(uuid.UUID, ...), at=(datetime, ...), count=(int, 3), ratio=(float | None, None), urgent=(bool, False),
        priority=(Priority, Field(description="How soon.")), was=(Priority, Priority.LOW),
        email=(EmailAddress, ...), body=(PersonalText | None, None), tags=(tuple[str, ...], ()))
    assert model_schema(_domain(tmp_path, cls), cls) == {
        "type": "record", "name": TYPE, "namespace": "tickets.events", "doc": "A ticket was filed.\n\nBy a customer.",
        "fields": [
            {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "count", "type": "long", "default": 3},
            {"name": "ratio", "type": ["null", "double"], "default": None},
            {"name": "urgent", "type": "boolean", "default": False},
            {"name": "priority", "type": {"type": "enum", "name": "Priority", "symbols": ["low", "high"]},
             "doc": "How soon."},
            {"name": "was", "type": "Priority", "default": "low"},
            {"name": "email", "type": "string", "keel.personal": True},
            {"name": "body", "type": ["null", "string"], "default": None, "keel.personal": True},
            {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
        ]}


def test_a_field_avro_cannot_carry_is_refused_by_name(tmp_path: Path) -> None:
    cls = _model(title=(str, ...), extra=(dict[str, int], ...))
    with pytest.raises(SchemaError) as raised:
        model_schema(_domain(tmp_path, cls), cls)
    assert (raised.value.code, raised.value.type_name, raised.value.field) == (
        "schema_unsupported_type", TYPE, "extra")


def test_the_example_domains_and_keels_own_types_have_no_schema_problem_and_nothing_to_freeze() -> None:
    registry = build((load(source) for source in sources()), check_schemas=False)
    assert {"support_desk", "deploys"} <= {domain.name for domain in registry.domains}
    for owner in (keel_owner(), *(owner_of(domain) for domain in registry.domains)):
        assert problems(owner) == [], owner.name
        assert plan_freeze(owner) == [], owner.name  # their released v1 files get no new version
    for domain in registry.domains:
        assert schema_problems(domain) == []


def test_a_missing_schema_is_refused_at_start_naming_the_type(tmp_path: Path) -> None:
    problem = _only(schema_problems(_domain(tmp_path, V1)))
    assert (problem.type_name, problem.code) == (TYPE, "schema_missing")
    assert "keel schemas freeze" in problem.message
    with pytest.raises(DomainError) as raised:
        build([_domain(tmp_path, V1)])
    assert (raised.value.code, raised.value.domain, raised.value.type_name) == ("schema_missing", "tickets", TYPE)


@pytest.mark.parametrize(("changed", "field", "words"), [
    (_model(title=(str, ...), note=(str | None, None)), "note", "new in the model"),
    (_model(title=(int, ...)), "title", "changed type"),
    (_model(title=(PersonalText, ...)), "title", "became personal"),
    (_model(title=(str, "untitled")), "title", "changed its default"),
    (_model(), "title", "no longer in the model"),
])
def test_a_model_changed_without_freeze_is_outdated_naming_the_field(
        tmp_path: Path, changed: type[Event], field: str, words: str) -> None:
    _release(tmp_path, V1, 1)
    problem = _only(schema_problems(_domain(tmp_path, changed)))
    assert (problem.type_name, problem.field, problem.code) == (TYPE, field, "schema_outdated")
    assert words in problem.message and "keel schemas freeze" in problem.message


def test_docs_do_not_count_as_a_change(tmp_path: Path) -> None:
    _release(tmp_path, V1, 1)
    documented = create_model(TYPE, __base__=Event, __doc__="Now documented.",
                              title=(str, Field(description="What it is about.")))
    assert schema_problems(_domain(tmp_path, documented)) == []


@pytest.mark.parametrize(("v2", "field", "words"), [
    (_model(2, title=(str, ...), owner=(str, ...)), "owner", "has no default"),
    (_model(2, title=(int, ...)), "title", "changed type"),
    (_model(2, title=(str, ...), note=(int, ...)), "note", "has no default"),
])
def test_an_older_version_the_newest_cannot_read_is_refused_naming_the_field(
        tmp_path: Path, v2: type[Event], field: str, words: str) -> None:
    _release(tmp_path, V1, 1)
    _release(tmp_path, v2, 2)
    problem = _only(schema_problems(_domain(tmp_path, v2)))
    assert (problem.type_name, problem.field, problem.code) == (TYPE, field, "schema_incompatible")
    assert "v1 records cannot be read as v2" in problem.message and words in problem.message
    with pytest.raises(DomainError) as raised:
        build([_domain(tmp_path, v2)])
    assert (raised.value.code, raised.value.type_name) == ("schema_incompatible", TYPE)


def test_a_gap_in_the_released_versions_is_refused(tmp_path: Path) -> None:
    _release(tmp_path, V1, 1)
    _release(tmp_path, V1, 3)
    problem = _only(schema_problems(_domain(tmp_path, _model(3, title=(str, ...)))))
    assert (problem.code, problem.type_name) == ("schema_missing", TYPE) and "lacks v2" in problem.message


def test_freeze_writes_the_first_version_then_nothing(tmp_path: Path) -> None:
    [frozen] = freeze([owner_of(_domain(tmp_path, V1))])
    assert frozen.path == tmp_path / "schemas" / "events" / TYPE / "v1.avsc"
    assert json.loads(frozen.path.read_text()) == model_schema(_domain(tmp_path, V1), V1)
    assert freeze([owner_of(_domain(tmp_path, V1))]) == []


def test_freeze_writes_a_compatible_change_as_v2_and_keeps_v1(tmp_path: Path) -> None:
    v1 = _release(tmp_path, V1, 1)
    released = v1.read_bytes()
    changed = _model(title=(str, ...), note=(str | None, None))
    [frozen] = freeze([owner_of(_domain(tmp_path, changed))])
    assert (frozen.path.name, frozen.version, frozen.type_name) == ("v2.avsc", 2, TYPE)
    assert "note" in frozen.change
    assert v1.read_bytes() == released
    # The model must now say it is v2: records it makes are written with v2.
    problem = _only(schema_problems(_domain(tmp_path, changed)))
    assert problem.code == "schema_outdated" and "schema_version" in problem.message
    changed.schema_version = 2
    assert schema_problems(_domain(tmp_path, changed)) == []


def test_freeze_refuses_an_incompatible_change_and_writes_nothing(tmp_path: Path) -> None:
    _release(tmp_path, V1, 1)
    before = sorted((tmp_path / "schemas").rglob("*"))
    broken = _model(title=(str, ...), owner=(str, ...))
    with pytest.raises(IncompatibleSchema) as raised:
        freeze([owner_of(_domain(tmp_path, _model(title=(str, ...), note=(str | None, None)))),
                owner_of(_domain(tmp_path, broken))])
    assert (raised.value.code, raised.value.type_name, raised.value.field) == ("schema_incompatible", TYPE, "owner")
    assert sorted((tmp_path / "schemas").rglob("*")) == before


def _retitle(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 -> v2: ``title`` became ``subject``."""
    return {"subject": payload["title"]}


V2 = _model(2, subject=(str, ...))


def test_an_incompatible_change_with_an_upcaster_is_frozen_and_checked(tmp_path: Path) -> None:
    _release(tmp_path, V1, 1)
    with pytest.raises(IncompatibleSchema) as raised:
        plan_freeze(owner_of(_domain(tmp_path, V2)))
    assert raised.value.field == "subject" and "upcaster" in raised.value.message
    [frozen] = freeze([owner_of(_domain(tmp_path, V2, {(TYPE, 1): _retitle}))])
    assert frozen.version == 2
    assert schema_problems(_domain(tmp_path, V2, {(TYPE, 1): _retitle})) == []
    problem = _only(schema_problems(_domain(tmp_path, V2)))
    assert (problem.code, problem.field) == ("schema_incompatible", "subject")


@pytest.mark.parametrize(("key", "upcaster", "words"), [
    ((TYPE, 1), _retitle, "run `keel schemas freeze` to write v2"),
    (("NoSuchType", 1), _retitle, "has no type NoSuchType"),
    ((TYPE, 1), "not callable", "not a function"),
])
def test_an_upcaster_that_can_never_run_is_refused(tmp_path: Path, key: tuple[str, int], upcaster: Any,
                                                    words: str) -> None:
    _release(tmp_path, V1, 1)
    problem = _only(schema_problems(_domain(tmp_path, V1, {key: upcaster})))
    assert (problem.code, problem.type_name) == ("upcaster_invalid", key[0]) and words in problem.message


def _of(cls: type[Event], **values: Any) -> Event:
    """An instance of a model made with ``create_model`` (its fields are unknown to mypy)."""
    return cls.model_validate(values)


def _envelope(payload: Event, version: int) -> Envelope:
    return Envelope(id=uuid.uuid4(), tenant_id="acme", actor=Actor(kind=ActorKind.AGENT, id="bot"), type=TYPE,
                    schema_version=version, aggregate_id="t-1", correlation_id=uuid.uuid4(),
                    occurred_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), payload=payload)


def test_the_codec_reads_an_old_record_through_the_upcaster_chain(tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    def retitle(payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(payload)
        return _retitle(payload)

    v3 = _model(3, subject=(str, ...), note=(str | None, None))  # v2 -> v3 is compatible: resolved by Avro
    for version, cls in ((1, V1), (2, V2), (3, v3)):
        _release(tmp_path, cls, version)
    domain = _domain(tmp_path, v3, {(TYPE, 1): retitle})
    assert schema_problems(domain) == []
    codec = EnvelopeCodec(load_catalog(domains=(domain,)))

    old = codec.read(codec.encode(_envelope(_of(V1, title="printer on fire"), 1)))
    assert calls == [{"title": "printer on fire"}]
    assert old["schema_version"] == 3 and old["payload"] == {"subject": "printer on fire", "note": None}
    assert v3.model_validate(old["payload"]) == _of(v3, subject="printer on fire")

    middle = codec.read(codec.encode(_envelope(_of(V2, subject="queue stuck"), 2)))
    newest = codec.read(codec.encode(_envelope(_of(v3, subject="fixed", note="by Ada"), 3)))
    assert len(calls) == 1  # a v2 or v3 record never meets the v1 upcaster
    assert (middle["payload"], middle["schema_version"]) == ({"subject": "queue stuck", "note": None}, 3)
    assert newest["payload"] == {"subject": "fixed", "note": "by Ada"}


def test_an_old_record_decodes_as_v2_when_the_upcaster_reaches_the_newest(tmp_path: Path) -> None:
    _release(tmp_path, V1, 1)
    _release(tmp_path, V2, 2)
    codec = EnvelopeCodec(load_catalog(domains=(_domain(tmp_path, V2, {(TYPE, 1): _retitle}),)))
    sent = _envelope(_of(V1, title="printer on fire"), 1)
    record = codec.read(codec.encode(sent))
    assert record["schema_version"] == 2 and record["id"] == sent.id
    assert V2.model_validate(record["payload"]) == _of(V2, subject="printer on fire")


def _raises(payload: dict[str, Any]) -> dict[str, Any]:
    raise KeyError("subject")


@pytest.mark.parametrize(("upcaster", "words"), [
    (_raises, f"the upcaster of {TYPE} v1 failed: KeyError"),
    (lambda payload: {}, f"an upcaster of {TYPE} made no v2 payload"),  # v2 is re-encoded on its way to v3
])
def test_an_upcaster_that_fails_is_a_typed_decode_error(tmp_path: Path, upcaster: Upcaster, words: str) -> None:
    for version, cls in ((1, V1), (2, V2), (3, _model(3, subject=(str, ...), note=(str | None, None)))):
        _release(tmp_path, cls, version)
    codec = EnvelopeCodec(load_catalog(domains=(_domain(tmp_path, V2, {(TYPE, 1): upcaster}),)))
    with pytest.raises(DecodeError) as raised:
        codec.read(codec.encode(_envelope(_of(V1, title="x"), 1)))
    assert raised.value.code == "upcast_failed" and words in raised.value.message
