"""Schema evolution of every domain's types: a model's schema, freezing it, and proving old records read.

A type's released schemas are ``<schemas>/{commands,events}/<Type>/v<N>.avsc``, numbered from
1 without gaps, and a released version is never edited: records written with it live in
the topics for good. The pydantic model is the newest version. ``model_schema`` writes the
Avro record a model means; ``freeze`` writes it as the next version when it differs from
the newest file (by Parsing Canonical Form, ``keel.personal`` flags and defaults: docs do
not count). ``problems`` proves that the model and the newest file agree and that every
older version is still readable, along the path the codec reads it: Avro schema
resolution (Apache Avro's compatibility checker) from each version to the newest one, or
to the first later version with an upcaster, whose function then turns the record into
the next version's shape. ``registry.build`` refuses to start on any problem, so a type
whose schema is missing, stale or unreadable never reaches a topic.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fastavro import parse_schema
from fastavro.schema import to_parsing_canonical_form
from pydantic.fields import FieldInfo

from keel.contracts.catalog import SCHEMA_ROOT, Upcaster, compose
from keel.domain.envelope import Payload
from keel.domain.personal import is_personal
from keel.domains.model import Domain
from keel.errors import KeelError

if TYPE_CHECKING:
    from avro.schema import Schema

KEEL = "keel"
"""The owner name of Keel's own governance types (``schemas/`` of the project)."""
_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")
_SCALARS: dict[type, Any] = {
    bool: "boolean", str: "string", int: "long", float: "double",
    uuid.UUID: {"type": "string", "logicalType": "uuid"},
    datetime: {"type": "long", "logicalType": "timestamp-micros"},
}
_SUPPORTED = "str, int, float, bool, UUID, datetime, a StrEnum, a list or tuple of those, or one of those | None"
_HOW_TO_BREAK = "make the change compatible or declare an upcaster (docs/schemas.md)"


class SchemaError(KeelError):
    """A type's schemas cannot be used or written; ``type_name`` and ``field`` say where."""

    code = "schema_invalid"

    def __init__(self, message: str, *, type_name: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(f"{type_name}: {message}", code=code, field=field)
        self.type_name = type_name
        self.reason = message


class IncompatibleSchema(SchemaError):
    """A change would leave records of an older version unreadable; ``keel schemas freeze`` refuses it."""

    code = "schema_incompatible"


@dataclass(frozen=True)
class SchemaProblem:
    """One way a type's model and its released schemas disagree; ``message`` names the field."""

    type_name: str
    field: str | None
    message: str
    code: str


@dataclass(frozen=True)
class Owner:
    """Whose schemas: a registered domain, or Keel's own governance types (``keel``)."""

    name: str
    schemas: Path
    namespace: str
    types: tuple[type[Payload], ...]
    upcasters: Mapping[tuple[str, int], Upcaster]

    def folder(self, cls: type[Payload]) -> Path:
        """Where the versions of ``cls``'s schema live."""
        return self.schemas / f"{cls.kind}s" / cls.__name__


@dataclass(frozen=True)
class Frozen:
    """A schema version ``freeze`` writes: the file, the type and what changed since the last one."""

    path: Path
    cls: type[Payload]
    version: int
    schema: dict[str, Any]
    change: str

    @property
    def type_name(self) -> str:
        return self.cls.__name__


def owner_of(domain: Domain) -> Owner:
    """The schema owner a registered domain is."""
    return Owner(domain.name, domain.schemas, domain.namespace, (*domain.commands, *domain.events), domain.upcasters)


def keel_owner() -> Owner:
    """Keel's own commands and events, whose schemas are the project's ``schemas/``."""
    from keel.domain.messages import CORE_PAYLOADS

    return Owner(KEEL, SCHEMA_ROOT, KEEL, tuple(CORE_PAYLOADS.values()), {})


def model_schema(owner: Domain | Owner, cls: type[Payload]) -> dict[str, Any]:
    """The Avro record ``cls`` means: its fields in order, docs from its docstring and descriptions.

    Raises ``SchemaError`` (``schema_unsupported_type``) naming the field whose type Avro
    cannot carry as Keel encodes payloads.
    """
    record: dict[str, Any] = {"type": "record", "name": cls.__name__, "namespace": f"{owner.namespace}.{cls.kind}s"}
    if cls.__doc__:
        record["doc"] = inspect.cleandoc(cls.__doc__)
    named: set[str] = set()
    record["fields"] = [_field(cls.__name__, name, info, named) for name, info in cls.model_fields.items()]
    return record


def _field(type_name: str, name: str, info: FieldInfo, named: set[str]) -> dict[str, Any]:
    annotation = info.annotation
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation)
    if optional:
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        annotation = rest[0] if len(rest) == 1 else annotation  # a union of several types has no Avro type here
    avro = _avro_type(annotation, named)
    if avro is None:
        raise SchemaError(f"field {name!r} is a {annotation!r}; a schema field can be {_SUPPORTED}",
                          type_name=type_name, field=name, code="schema_unsupported_type")
    field: dict[str, Any] = {"name": name, "type": ["null", avro] if optional else avro}
    if not info.is_required() and info.default_factory is None:
        if optional and info.default is not None:
            raise SchemaError(f"field {name!r} is optional with a default other than None, which Avro cannot "
                              "express; default it to None", type_name=type_name, field=name,
                              code="schema_unsupported_type")
        field["default"] = _avro_default(info.default)
    if is_personal(info):
        field["keel.personal"] = True
    if info.description:
        field["doc"] = info.description
    return field


def _avro_type(annotation: Any, named: set[str]) -> Any:
    """The Avro type of a non-optional annotation, or None when it has none."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        if annotation.__name__ in named:  # Avro defines a name once; later uses refer to it
            return annotation.__name__
        named.add(annotation.__name__)
        return {"type": "enum", "name": annotation.__name__, "symbols": [member.value for member in annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and len(args) == 1 or origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        items = _avro_type(args[0], named)
        return None if items is None else {"type": "array", "items": items}
    return None


def _avro_default(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return [_avro_default(item) for item in value]
    if isinstance(value, StrEnum):
        return value.value
    return value


def released(folder: Path) -> dict[int, Path]:
    """The released versions of one type's schema folder, by number (empty when there is none)."""
    if not folder.is_dir():
        return {}
    found = {int(match.group(1)): path for path in folder.iterdir()
             if (match := _VERSION_FILE.fullmatch(path.name))}
    return dict(sorted(found.items()))


def _versions(type_name: str, folder: Path) -> dict[int, dict[str, Any]]:
    """The released schemas of one type, by version; raises ``SchemaError`` on a gap or an unreadable file."""
    paths = released(folder)
    gaps = [f"v{v}" for v in range(1, max(paths, default=0) + 1) if v not in paths]
    if gaps:
        raise SchemaError(f"{folder} lacks {', '.join(gaps)}: released versions are never deleted",
                          type_name=type_name, code="schema_missing")
    return {version: _read(type_name, path) for version, path in paths.items()}


def _read(type_name: str, path: Path, *, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """The schema in ``path`` (an envelope composed with ``payload``), checked to parse."""
    try:
        schema = json.loads(path.read_text())
        if payload is not None:
            schema = compose(schema, payload)
        parse_schema(schema, _force=True)
    except Exception as exc:  # JSON and fastavro raise several kinds; all mean the file is unusable
        raise SchemaError(f"{path} is no Avro schema: {exc}", type_name=type_name) from exc
    return cast(dict[str, Any], schema)


def _signature(schema: Mapping[str, Any]) -> tuple[str, list[tuple[str, bool, bool, object]]]:
    """What makes two schemas the same contract: canonical form, personal flags and defaults (not docs)."""
    canonical = to_parsing_canonical_form(parse_schema(dict(schema), _force=True))
    marks = [(f["name"], f.get("keel.personal") is True, "default" in f, f.get("default")) for f in schema["fields"]]
    return canonical, marks


def _difference(model: Mapping[str, Any], latest: Mapping[str, Any]) -> tuple[str | None, str]:
    """The first field where ``model`` and ``latest`` differ and how (both differ by signature)."""
    new = {f["name"]: f for f in model["fields"]}
    old = {f["name"]: f for f in latest["fields"]}
    added = next((name for name in new if name not in old), None)
    if added is not None:
        return added, f"field {added!r} is new in the model"
    removed = next((name for name in old if name not in new), None)
    if removed is not None:
        return removed, f"field {removed!r} is no longer in the model"
    for name, field in new.items():
        before = old[name]
        if _undocumented(field["type"]) != _undocumented(before["type"]):
            return name, f"field {name!r} changed type from {json.dumps(before['type'])} to {json.dumps(field['type'])}"
        if (field.get("keel.personal") is True) != (before.get("keel.personal") is True):
            return name, f"field {name!r} {'became' if field.get('keel.personal') else 'is no longer'} personal"
        if ("default" in field, field.get("default")) != ("default" in before, before.get("default")):
            return name, f"field {name!r} changed its default"
    if list(new) != list(old):
        return None, "the fields changed order"
    return None, f"the record is now {model['namespace']}.{model['name']}"


def _undocumented(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _undocumented(v) for k, v in value.items() if k != "doc"}
    if isinstance(value, list):
        return [_undocumented(v) for v in value]
    return value


def _readable(type_name: str, versions: Mapping[int, Mapping[str, Any]], upcasts: Iterable[int]
              ) -> list[SchemaProblem]:
    """Every version that cannot be read along the codec's path to the newest one.

    Version ``v`` is resolved to the first version after it with an upcaster, or to the
    newest; a version with an upcaster is the upcaster's to turn into the next one.
    """
    latest = max(versions)
    if latest == 1:
        return []
    # Imported here: a process start pays for it only when some type has older versions.
    from avro.schema import Schema, parse

    parsed: dict[int, Schema] = {}

    def avro(version: int) -> Schema:  # each version parsed once: parsing is most of the cost
        if version not in parsed:
            parsed[version] = parse(json.dumps(versions[version]))
        return parsed[version]

    stops = sorted(v for v in upcasts if v < latest)
    problems = []
    for version in versions:
        if version == latest or version in stops:
            continue
        target = next((stop for stop in stops if stop > version), latest)
        field, reason = _incompatibility(avro(target), avro(version))
        if reason is not None:
            problems.append(SchemaProblem(type_name, field, f"v{version} records cannot be read as v{target}: "
                                          f"{reason}; {_HOW_TO_BREAK}", "schema_incompatible"))
    return problems


def _incompatibility(reader: Schema, writer: Schema) -> tuple[str | None, str | None]:
    """(field, why) when Avro schema resolution cannot read ``writer``'s records with ``reader``, else (None, None).

    The checker's own locations lose the field inside unions, so the field to blame is
    the first one of ``reader`` that cannot be read on its own.
    """
    from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType, lookup_writer_field
    from avro.schema import RecordSchema

    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]  # avro leaves __init__ bare
    verdict = checker.get_compatibility(reader, writer)
    if verdict.compatibility is not SchemaCompatibilityType.incompatible:
        return None, None
    if isinstance(reader, RecordSchema) and isinstance(writer, RecordSchema):
        for field in reader.fields:
            before = lookup_writer_field(writer, field)
            if before is None:
                if not field.has_default:
                    return field.name, f"field {field.name!r} has no default and those records lack it"
                continue
            verdict_of_field = checker.get_compatibility(field.type, before.type)
            if verdict_of_field.compatibility is SchemaCompatibilityType.incompatible:
                kind = verdict_of_field.incompatibilities[0].value
                what = _INCOMPATIBLE.get(kind, kind.replace("_", " "))
                return field.name, f"field {field.name!r} {what} ({'; '.join(sorted(verdict_of_field.messages))})"
    return None, f"the record cannot be read ({'; '.join(sorted(verdict.messages))})"


_INCOMPATIBLE = {
    "type_mismatch": "changed type",
    "missing_enum_symbols": "lost enum symbols",
    "missing_union_branch": "no longer accepts a type those records hold",
}


def problems(owner: Owner) -> list[SchemaProblem]:
    """Every way ``owner``'s models and released schemas disagree, by type."""
    found = [problem for cls in owner.types for problem in _type_problems(owner, cls)]
    for key, upcaster in owner.upcasters.items():
        problem = _upcaster_problem(owner, key, upcaster)
        found += [problem] if problem else []
    if owner.name == KEEL:
        found += _envelope_problems()
    return found


def _upcaster_problem(owner: Owner, key: tuple[str, int], upcaster: object) -> SchemaProblem | None:
    """Why an upcaster can never run, if it cannot: no such type, no next version, not a function."""
    type_name, version = key
    cls = next((c for c in owner.types if c.__name__ == type_name), None)
    if cls is None:
        why = f"{owner.name} has no type {type_name}"
    elif not callable(upcaster):
        why = "it is not a function"
    elif not 1 <= version < (latest := max(released(owner.folder(cls)), default=0)):
        why = f"the released versions are v1..v{latest}: run `keel schemas freeze` to write v{version + 1}"
    else:
        return None
    return SchemaProblem(type_name, None, f"has an upcaster from v{version}, but {why}", "upcaster_invalid")


def schema_problems(domain: Domain) -> list[SchemaProblem]:
    """Every way ``domain``'s models and schema folder disagree (run at every process start)."""
    return problems(owner_of(domain))


def _type_problems(owner: Owner, cls: type[Payload]) -> list[SchemaProblem]:
    name, folder = cls.__name__, owner.folder(cls)
    try:
        versions = _versions(name, folder)
        model = model_schema(owner, cls)
    except SchemaError as exc:
        return [SchemaProblem(name, exc.field, exc.reason, exc.code)]
    if not versions:
        return [SchemaProblem(name, None, f"has no schema in {folder}; run `keel schemas freeze`", "schema_missing")]
    latest = max(versions)
    found = []
    if _signature(model) != _signature(versions[latest]):
        field, what = _difference(model, versions[latest])
        found.append(SchemaProblem(name, field, f"the model differs from v{latest}.avsc: {what}; "
                                   "run `keel schemas freeze`", "schema_outdated"))
    elif cls.schema_version != latest:
        found.append(SchemaProblem(name, None, f"the model declares schema_version = {cls.schema_version} and its "
                                   f"schema is v{latest}: set `schema_version: ClassVar[int] = {latest}` on {name}",
                                   "schema_outdated"))
    return found + _readable(name, versions, _upcasts(owner, name))


def _upcasts(owner: Owner, type_name: str) -> set[int]:
    return {version for (name, version) in owner.upcasters if name == type_name}


def _envelope_problems() -> list[SchemaProblem]:
    """Whether every envelope version is readable with the newest (composed with an empty payload)."""
    paths = released(SCHEMA_ROOT / "envelope")
    payload = {"type": "record", "name": "Payload", "namespace": KEEL, "fields": []}
    try:
        versions = {v: _read("envelope", path, payload=payload) for v, path in paths.items()}
    except SchemaError as exc:
        return [SchemaProblem("envelope", None, exc.reason, exc.code)]
    return _readable("envelope", versions, ()) if versions else [
        SchemaProblem("envelope", None, f"has no schema in {SCHEMA_ROOT / 'envelope'}", "schema_missing")]


def plan_freeze(owner: Owner) -> list[Frozen]:
    """The schema versions ``freeze`` would write for ``owner``; raises when one would break a reader.

    Raises ``IncompatibleSchema`` naming the type and field when older versions could not
    be read with the new one, and ``SchemaError`` for a model Avro cannot express or a
    schema folder that is already broken.
    """
    planned = []
    for cls in owner.types:
        name, folder = cls.__name__, owner.folder(cls)
        model = model_schema(owner, cls)
        versions = _versions(name, folder)
        latest = max(versions, default=0)
        if latest and _signature(model) == _signature(versions[latest]):
            continue
        change = _difference(model, versions[latest])[1] if latest else "first version"
        refused = _readable(name, {**versions, latest + 1: model}, _upcasts(owner, name))
        if refused:
            first = refused[0]
            raise IncompatibleSchema(f"nothing written: {first.message}", type_name=name, field=first.field)
        planned.append(Frozen(folder / f"v{latest + 1}.avsc", cls, latest + 1, model, change))
    return planned


def freeze(owners: Iterable[Owner]) -> list[Frozen]:
    """Write every changed model of ``owners`` as its type's next version: all of them, or none.

    Every owner is planned before a file is written, so a refusal leaves every folder as it was.
    """
    planned = [frozen for owner in owners for frozen in plan_freeze(owner)]
    for frozen in planned:
        frozen.path.parent.mkdir(parents=True, exist_ok=True)
        with frozen.path.open("x") as out:  # "x": a released version is never overwritten
            out.write(render(frozen.schema))
    return planned


def render(schema: Mapping[str, Any]) -> str:
    """A record schema in the layout of the released files: a header line, then one field per line."""
    head = json.dumps({k: v for k, v in schema.items() if k != "fields"}, ensure_ascii=False)[:-1]
    fields = ",\n".join(f"  {json.dumps(field, ensure_ascii=False)}" for field in schema["fields"])
    return f"{head},\n \"fields\": [\n{fields}\n ]}}\n"
