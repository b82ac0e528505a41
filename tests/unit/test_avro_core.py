"""The native Avro core (``keel_avro``) writes fastavro's bytes and reads fastavro's values.

Every message schema in the catalog is exercised with varied records (optional fields unset
and set, empty, long and non-ASCII strings, extreme integers, arrays of several lengths, UUIDs
as objects and as text, timestamps across the calendar), compared with fastavro byte for byte
and value for value, types included. Corrupt bytes must raise, and values the native plan
does not write must reach fastavro, which writes or rejects them as it always has.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.utils import generate_many

from keel.contracts import codec as codec_module
from keel.contracts.catalog import MessageSchema, load_catalog
from keel.contracts.codec import AVRO_CORE, HEADER_SIZE, MAGIC, EnvelopeCodec, native_plan, to_record
from keel.domain.envelope import Actor, ActorKind, DelegationLink, Envelope, new_command
from keel.errors import DecodeError
from support_desk.messages import IssueRefund

# `make setup` builds the core wherever cargo is (CI has it): a suite that skipped itself
# there would hide a broken build, so without the core this fails, saying so.
try:
    import keel_avro
except ImportError as missing:  # pragma: no cover - a machine whose setup found no cargo
    raise ImportError("keel_avro is not installed: `make setup` builds it when cargo is on PATH "
                      "(Keel then runs on fastavro; these tests compare the two)") from missing

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog()
SCHEMAS = sorted(CATALOG.by_fingerprint.values(), key=lambda s: (s.message_type, s.envelope_version, s.payload_version))
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
STRINGS = ["", "a", "x" * 300, "ünïcødé ✓ 日本語 🚀", "\x00nul and\nnewline", "é" * 70]
LONGS = [0, 1, -1, 63, -64, 64, -65, 2**31 - 1, -(2**31), 2**31, 2**53 + 1, LONG_MAX, LONG_MIN]
INSTANTS = [datetime(1970, 1, 1, tzinfo=UTC), datetime(2026, 11, 22, 12, 30, 1, 123456, tzinfo=UTC),
            datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC),
            datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(2000, 2, 29, 6, tzinfo=UTC),
            datetime(1900, 3, 1, tzinfo=UTC)]


def _definitions(schema: Any, named: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every named type defined in ``schema``, by full name."""
    named = {} if named is None else named
    if isinstance(schema, list):
        for branch in schema:
            _definitions(branch, named)
    elif isinstance(schema, dict):
        if schema["type"] in ("record", "enum", "fixed"):
            named[schema["name"]] = schema
        for field in schema.get("fields", ()):
            _definitions(field["type"], named)
        for key in ("items", "values"):
            if key in schema:
                _definitions(schema[key], named)
    return named


def _sample(schema: Any, rng: random.Random, named: dict[str, Any]) -> Any:
    """A value of ``schema`` as Keel's models hand it to the codec, drawn from edge cases."""
    if isinstance(schema, list):
        return _sample(rng.choice(schema), rng, named)
    if isinstance(schema, str):
        if schema in named:
            return _sample(named[schema], rng, named)
        schema = {"type": schema}
    kind, logical = schema["type"], schema.get("logicalType")
    if logical == "uuid":
        value = uuid.UUID(int=rng.getrandbits(128))
        return value if rng.random() < 0.8 else str(value)
    if logical in ("timestamp-micros", "timestamp-millis"):
        anywhen = INSTANTS[0] + timedelta(microseconds=rng.randrange(-62_135_596_800_000_000, 253_402_300_800_000_000))
        now = 1_700_000_000_000_000 if logical == "timestamp-micros" else 1_700_000_000_000
        return rng.choice([*INSTANTS, anywhen, anywhen, 0, -1, now])
    match kind:
        case "null":
            return None
        case "boolean":
            return rng.random() < 0.5
        case "int":
            return rng.choice([0, 1, -1, 2**31 - 1, -(2**31), rng.randrange(-(2**31), 2**31)])
        case "long":
            return rng.choice([*LONGS, rng.randrange(LONG_MIN, LONG_MAX)])
        case "float":
            return rng.choice([0.0, -2.25, 3.4e38, 1e-45, 0.1, float("-inf"), float("nan"), rng.random()])
        case "double":
            return rng.choice([0.0, -0.0, 0.5, 1e-300, -1e300, float("inf"), float("nan"), rng.random()])
        case "bytes":
            return rng.randbytes(rng.choice([0, 1, 5, 300]))
        case "fixed":
            return rng.randbytes(schema["size"])
        case "map":
            return {rng.choice(STRINGS) + str(i): _sample(schema["values"], rng, named)
                    for i in range(rng.choice([0, 1, 3, 20]))}
        case "string":
            return rng.choice([*STRINGS, "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(40)))])
        case "enum":
            return rng.choice(schema["symbols"])
        case "array":
            return [_sample(schema["items"], rng, named) for _ in range(rng.choice([0, 1, 2, 7, 70]))]
        case "record":
            return {field["name"]: _sample(field["type"], rng, named) for field in schema["fields"]}
    raise AssertionError(f"no sample for {schema}")


def _records(schema: MessageSchema, count: int = 40) -> Iterator[dict[str, Any]]:
    rng = random.Random(schema.fingerprint)
    for _ in range(count):
        yield _sample(schema.parsed, rng, _definitions(schema.parsed))
    yield from generate_many(schema.parsed, 5)  # fastavro's own: hex UUIDs, integer timestamps


def _fastavro_bytes(schema: MessageSchema, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    buffer.write(MAGIC + schema.fingerprint)
    schemaless_writer(buffer, schema.parsed, record)
    return buffer.getvalue()


def _fastavro_read(schema: MessageSchema, data: bytes) -> Any:
    return schemaless_reader(io.BytesIO(data[HEADER_SIZE:]), schema.parsed, None)


def _assert_same(native: Any, expected: Any, path: str = "record") -> None:
    """Equal, and of the same Python types all the way down (True is not 1; aware is not naive)."""
    assert type(native) is type(expected), (path, native, expected)
    if isinstance(expected, dict):
        assert list(native) == list(expected), path
        for key in expected:
            _assert_same(native[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(native) == len(expected), path
        for i, (a, b) in enumerate(zip(native, expected, strict=True)):
            _assert_same(a, b, f"{path}[{i}]")
    elif isinstance(expected, datetime):
        assert native == expected and native.tzinfo is expected.tzinfo, path
    elif isinstance(expected, float) and expected != expected:
        assert native != native, path
    else:
        assert native == expected, (path, native, expected)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: f"{s.message_type}-e{s.envelope_version}p{s.payload_version}")
def test_native_plan_writes_and_reads_as_fastavro_does(schema: MessageSchema) -> None:
    plan = keel_avro.Plan(schema.parsed, MAGIC + schema.fingerprint)
    for record in _records(schema):
        expected = _fastavro_bytes(schema, record)
        assert plan.encode(record) == expected, record
        _assert_same(plan.decode(expected, HEADER_SIZE), _fastavro_read(schema, expected))


KITCHEN_SINK = parse_schema({"type": "record", "name": "t.Sink", "fields": [
    {"name": "flag", "type": "boolean"}, {"name": "small", "type": "int"}, {"name": "big", "type": "long"},
    {"name": "single", "type": "float"}, {"name": "double", "type": "double"}, {"name": "raw", "type": "bytes"},
    {"name": "text", "type": "string"}, {"name": "nothing", "type": "null"},
    {"name": "four", "type": {"type": "fixed", "name": "t.Four", "size": 4}}, {"name": "again", "type": "t.Four"},
    {"name": "color", "type": {"type": "enum", "name": "t.Color", "symbols": ["red", "green", "blue"]}},
    {"name": "colors", "type": {"type": "map", "values": ["null", "t.Color"]}},
    {"name": "millis", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "micros", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}]},
    {"name": "ref", "type": [{"type": "string", "logicalType": "uuid"}, "null"]},
    {"name": "rows", "type": {"type": "array", "items": {"type": "array", "items": "double"}}},
    {"name": "only", "type": ["string"]},
    {"name": "link", "type": ["null", {"type": "record", "name": "t.Link", "fields": [
        {"name": "four", "type": "t.Four"}, {"name": "tags", "type": {"type": "array", "items": "string"}}]}]},
    {"name": "links", "type": {"type": "array", "items": "t.Link"}},
]})


def test_every_supported_avro_type_is_written_and_read_as_fastavro_does() -> None:
    plan = keel_avro.Plan(KITCHEN_SINK, b"")
    rng = random.Random(3)
    for _ in range(300):
        record = _sample(KITCHEN_SINK, rng, _definitions(KITCHEN_SINK))
        buffer = io.BytesIO()
        schemaless_writer(buffer, KITCHEN_SINK, record)
        assert plan.encode(record) == buffer.getvalue(), record
        _assert_same(plan.decode(buffer.getvalue()), schemaless_reader(io.BytesIO(buffer.getvalue()), KITCHEN_SINK, None))


def test_the_codec_compiles_every_catalog_schema_unless_told_not_to() -> None:
    assert all((native_plan(schema) is None) == (AVRO_CORE == "python") for schema in SCHEMAS)


def test_the_codec_runs_the_native_core() -> None:
    assert AVRO_CORE == ("python" if os.environ.get("KEEL_AVRO") == "python" else "native")


@pytest.mark.parametrize("choice", ["python", "native", "rust"])
def test_keel_avro_chooses_the_core(choice: str) -> None:
    done = subprocess.run([sys.executable, "-c", "from keel.contracts.codec import AVRO_CORE; print(AVRO_CORE)"],
                          cwd=ROOT, env={**os.environ, "KEEL_AVRO": choice}, capture_output=True, text=True,
                          timeout=60)
    if choice == "rust":
        assert done.returncode != 0 and "KEEL_AVRO must be 'native' or 'python'" in done.stderr
    else:
        assert done.stdout.strip() == choice, done.stderr


def _valid_message() -> tuple[MessageSchema, bytes]:
    schema = CATALOG.latest("SendEmail")
    record = _sample(schema.parsed, random.Random(7), _definitions(schema.parsed))
    record["delegation"] = [{"actor": {"kind": "human", "id": "jane"}, "reason": "asked"}] * 3
    return schema, _fastavro_bytes(schema, record)


def test_every_truncation_is_corrupt() -> None:
    schema, data = _valid_message()
    plan = keel_avro.Plan(schema.parsed, MAGIC + schema.fingerprint)
    for end in range(HEADER_SIZE, len(data)):
        with pytest.raises(keel_avro.CorruptData):
            plan.decode(data[:end], HEADER_SIZE)
        with pytest.raises(DecodeError) as caught:
            EnvelopeCodec().read(data[:end])
        assert caught.value.code == "undecodable"


def test_garbage_never_reads_as_something_fastavro_reads_otherwise() -> None:
    """Random bodies: the native core raises CorruptData, or reads exactly what fastavro reads."""
    schema, _ = _valid_message()
    plan = keel_avro.Plan(schema.parsed, MAGIC + schema.fingerprint)
    rng = random.Random(19)
    for _ in range(3000):
        data = MAGIC + schema.fingerprint + rng.randbytes(rng.randrange(0, 200))
        try:
            native = plan.decode(data, HEADER_SIZE)
        except keel_avro.CorruptData:
            with pytest.raises(DecodeError):
                EnvelopeCodec().read(data)
            continue
        _assert_same(native, _fastavro_read(schema, data))


@pytest.mark.parametrize(("schema", "body"), [
    ("string", b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f"),  # a length of 2**62
    ("string", b"\x03"),  # a negative length
    ("bytes", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"),  # a varint longer than 10 bytes
    ({"type": "array", "items": "long"}, b"\xfe\xff\xff\xff\x0f\x02"),  # 2**31 items, one byte left
    ({"type": "array", "items": "long"}, b"\x01\x02\x02"),  # a negative count, then its byte size
    ({"type": "map", "values": "long"}, b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f"),
    (["null", "string"], b"\x04"),  # union branch 2 of 2
    ({"type": "enum", "name": "E", "symbols": ["a"]}, b"\x02"),
    ({"type": "long", "logicalType": "timestamp-micros"}, b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01"),
    ({"type": "string", "logicalType": "uuid"}, b"\x08nope"),
    ("string", b"\x04\xff\xfe"),  # invalid UTF-8 (and short)
    ("string", b"\x06\xed\xa0\x80"),  # an encoded surrogate: not UTF-8
])
def test_oversized_and_malformed_values_are_corrupt(schema: Any, body: bytes) -> None:
    plan = keel_avro.Plan(parse_schema(schema), b"")
    with pytest.raises(keel_avro.CorruptData):
        plan.decode(body)
    with pytest.raises(Exception):  # noqa: B017, PT011 - fastavro rejects each too, with kinds of its own
        schemaless_reader(io.BytesIO(body), parse_schema(schema), None)


def test_a_negative_array_block_reads_as_in_fastavro() -> None:
    schema = parse_schema({"type": "array", "items": "long"})
    body = b"\x03\x04\x02\x04\x00"  # count -2, byte size 2, items 1 and 2, end
    _assert_same(keel_avro.Plan(schema, b"").decode(body), schemaless_reader(io.BytesIO(body), schema, None))


@pytest.mark.parametrize("schema", [
    {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2},
    {"type": "int", "logicalType": "date"},
    ["null", "string", "long"],
    {"type": "array", "items": "null"},
    {"type": "record", "name": "t.Node", "fields": [{"name": "next", "type": ["null", "t.Node"]}]},
])
def test_features_the_plan_lacks_are_unsupported(schema: Any) -> None:
    with pytest.raises(keel_avro.UnsupportedSchema):
        keel_avro.Plan(parse_schema(schema), b"")


def test_a_schema_the_plan_lacks_takes_fastavro() -> None:
    wide = parse_schema({"type": "record", "name": "keel.Wide", "fields": [
        {"name": "either", "type": ["null", "string", "long"]}]})
    assert isinstance(wide, dict)
    schema = MessageSchema("Wide", "commands", 1, 1, wide, b"\x00" * 8)
    assert native_plan(schema) is None


def _command() -> Envelope:
    return new_command(IssueRefund(amount_cents=500, currency="EUR", reason="late", confidence=0.5),
                       tenant_id="acme", aggregate_id="sub-1", actor=Actor(kind=ActorKind.AGENT, id="bot"),
                       on_behalf_of="cust-ada", delegation=(
                           DelegationLink(actor=Actor(kind=ActorKind.HUMAN, id="jane"), reason="asked"),
                           DelegationLink(actor=Actor(kind=ActorKind.SERVICE, id="desk"))))


def test_the_codec_encodes_and_reads_envelopes_as_fastavro_does() -> None:
    command = _command()
    schema = CATALOG.version(command.type, command.schema_version)
    data = EnvelopeCodec().encode(command)
    assert data == _fastavro_bytes(schema, to_record(command))
    _assert_same(EnvelopeCodec().read(data), _fastavro_read(schema, data))
    assert EnvelopeCodec().decode(data) == command


@pytest.mark.parametrize("update", [
    {"occurred_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))},  # not UTC
    {"schema_version": True},  # a bool for a plain int: fastavro writes 1
    {"schema_version": 2**31},  # fastavro writes any 64-bit value for an int
    {"payload": {"amount_cents": 1, "currency": "EUR", "reason": "", "confidence": 1}},  # fastavro writes 1.0
    {"delegation": ({"actor": {"kind": "human", "id": "jane"}, "reason": None},)},  # a tuple for the array
])
def test_values_the_plan_defers_are_written_by_fastavro(update: dict[str, Any]) -> None:
    command = _command()
    schema = CATALOG.version(command.type, command.schema_version)
    record = to_record(command) | update
    plan = keel_avro.Plan(schema.parsed, MAGIC + schema.fingerprint)
    if "delegation" in update:  # a tuple is a sequence to both: written natively
        assert plan.encode(record) == _fastavro_bytes(schema, record)
    else:
        assert plan.encode(record) is None
        _fastavro_bytes(schema, record)  # which fastavro writes


def test_the_codec_writes_what_fastavro_writes_for_a_deferred_value() -> None:
    command = _command().model_copy(update={"occurred_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
                                            .astimezone(timezone(timedelta(hours=-5)))})
    schema = CATALOG.version(command.type, command.schema_version)
    assert EnvelopeCodec().encode(command) == _fastavro_bytes(schema, to_record(command))


@pytest.mark.parametrize("update", [
    {"tenant_id": 5}, {"tenant_id": None}, {"tenant_id": "\ud800"}, {"schema_version": "1"},
    {"schema_version": 2**63}, {"expected_version": 2**63}, {"expected_version": True}, {"id": 12},
    {"occurred_at": "2026-01-01T00:00:00Z"}, {"traceparent": b"00-ab"}, {"actor": {"kind": "robot", "id": "x"}}, {"actor": {"id": "x"}},
    {"delegation": [{"reason": "x"}]}, {"delegation": "x"}, {"payload": None},
])
def test_a_record_that_does_not_fit_is_left_to_fastavro_to_reject(update: dict[str, Any]) -> None:
    command = _command()
    record = to_record(command) | update
    schema = CATALOG.version(command.type, command.schema_version)
    with pytest.raises((TypeError, ValueError, OverflowError)):
        _fastavro_bytes(schema, record)
    assert keel_avro.Plan(schema.parsed, b"").encode(record) is None


@pytest.mark.parametrize("update", [
    {"tenant_id": 5}, {"tenant_id": "\ud800"}, {"expected_version": 2**63}, {"id": 12}, {"traceparent": b"00"},
])
def test_the_codec_raises_as_fastavro_does_for_an_envelope_that_does_not_fit(update: dict[str, Any]) -> None:
    command = _command()
    schema = CATALOG.version(command.type, command.schema_version)
    with pytest.raises((TypeError, ValueError, OverflowError)) as fastavro_error:
        _fastavro_bytes(schema, to_record(command) | update)
    with pytest.raises(type(fastavro_error.value)) as caught:
        EnvelopeCodec().encode(command.model_copy(update=update))  # model_copy does not validate
    assert str(caught.value) == str(fastavro_error.value)


def test_uuid_text_is_str_of_any_uuid_and_of_anything_else() -> None:
    rng = random.Random(7)
    ids = [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.uuid4(), uuid.uuid1(),
           *(uuid.UUID(int=rng.getrandbits(128)) for _ in range(500))]
    assert [keel_avro.uuid_text(i) for i in ids] == [str(i) for i in ids]

    class Spelled(uuid.UUID):
        def __str__(self) -> str:
            return "spelled"

    assert keel_avro.uuid_text(Spelled(int=5)) == "spelled"
    assert keel_avro.uuid_text("text") == "text" and keel_avro.uuid_text(12) == "12"
    assert codec_module.uuid_text is keel_avro.uuid_text


def test_a_core_built_before_uuid_text_leaves_it_to_str() -> None:
    run = subprocess.run([sys.executable, "-c", (
        "import sys, types; sys.modules['keel_avro'] = types.ModuleType('keel_avro'); "
        "from keel.contracts import codec; print(codec.uuid_text is str)")], capture_output=True, text=True)
    assert run.stdout.strip() == "True", run.stderr
