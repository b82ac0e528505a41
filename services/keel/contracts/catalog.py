"""The schema catalog: every Avro schema version ever released, composed and fingerprinted.

``schemas/envelope/v<E>.avsc`` is the envelope; ``schemas/{commands,events}/<Type>/v<P>.avsc``
are Keel's own payloads, and each registered domain's ``schemas/`` folder holds its own in
the same layout. A message schema is the envelope with its ``payload`` field typed by one
payload record. Every (envelope, payload) version pair is a possible *writer* schema,
found by its CRC-64-AVRO fingerprint; the newest pair is the *reader* schema, so old
messages stay readable through Avro schema resolution. A type that changed incompatibly
also carries its domain's upcasters, by version, for the codec to apply on the way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

from keel.config import PROJECT_ROOT
from keel.errors import UnknownMessageType, UnknownSchema

if TYPE_CHECKING:
    from keel.domains.model import Domain

SCHEMA_ROOT = PROJECT_ROOT / "schemas"
PAYLOAD_KINDS = ("commands", "events")
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns a payload of one version of a type into the next version's (``Domain.upcasters``)."""


@dataclass(frozen=True)
class MessageSchema:
    """One composed (envelope version, payload version) schema of a message type."""

    message_type: str
    kind: str
    envelope_version: int
    payload_version: int
    parsed: dict[str, Any]
    fingerprint: bytes


@dataclass(frozen=True)
class Catalog:
    """All message schemas, by fingerprint and by type (newest last)."""

    by_fingerprint: dict[bytes, MessageSchema]
    by_type: dict[str, tuple[MessageSchema, ...]]
    upcasters: Mapping[str, Mapping[int, Upcaster]] = field(default_factory=dict)
    """Type -> payload version -> the function that turns its payload into the next version's."""

    def writer(self, fp: bytes) -> MessageSchema:
        """The schema a message with fingerprint ``fp`` was written with."""
        try:
            return self.by_fingerprint[fp]
        except KeyError:
            raise UnknownSchema(f"no schema in the catalog has fingerprint {fp.hex()}") from None

    def latest(self, message_type: str) -> MessageSchema:
        """The current (reader) schema of ``message_type``."""
        try:
            return self.by_type[message_type][-1]
        except KeyError:
            raise UnknownMessageType(f"no schema for message type {message_type!r}", field="type") from None

    def version(self, message_type: str, payload_version: int) -> MessageSchema:
        """The newest envelope composed with payload version ``payload_version``."""
        for schema in reversed(self.by_type.get(message_type, ())):
            if schema.payload_version == payload_version:
                return schema
        raise UnknownSchema(f"no schema for {message_type} v{payload_version}", field="schema_version")


def _versions(folder: Path) -> list[tuple[int, dict[str, Any]]]:
    found = sorted((int(path.stem[1:]), path) for path in folder.glob("v*.avsc"))
    return [(version, json.loads(path.read_text())) for version, path in found]


def compose(envelope: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The envelope schema with its payload field typed by ``payload``."""
    message = copy.deepcopy(envelope)
    message["name"] = f"{payload['name']}Message"
    for entry in message["fields"]:
        if entry["name"] == "payload":
            entry["type"] = payload
    return message


def load_catalog(root: Path = SCHEMA_ROOT, domains: Sequence[Domain] | None = None) -> Catalog:
    """Keel's schemas under ``root`` and those of ``domains`` (default: the registered ones)."""
    if domains is None:
        return _registered(root)
    catalog = _load(root, tuple(domain.schemas for domain in domains))
    upcasters: dict[str, dict[int, Upcaster]] = {}
    for domain in domains:
        for (message_type, version), upcaster in domain.upcasters.items():
            upcasters.setdefault(message_type, {})[version] = upcaster
    return replace(catalog, upcasters=upcasters) if upcasters else catalog


@cache
def _registered(root: Path) -> Catalog:
    """The catalog of the registered domains: the registry is loaded once per process, so is this
    (codecs and ciphers are built on hot paths)."""
    from keel.domains.registry import current

    return load_catalog(root, current().domains)


@cache
def _load(root: Path, domains: tuple[Path, ...]) -> Catalog:
    """Read and compose every schema (cached: schemas are code)."""
    envelopes = _versions(root / "envelope")
    by_fingerprint: dict[bytes, MessageSchema] = {}
    by_type: dict[str, list[MessageSchema]] = {}
    for kind in PAYLOAD_KINDS:
        folders = [p for base in (root, *domains) if (base / kind).is_dir() for p in (base / kind).iterdir()]
        for folder in sorted((p for p in folders if p.is_dir()), key=lambda p: p.name):
            for payload_version, payload in _versions(folder):
                for envelope_version, envelope in envelopes:
                    parsed = cast(dict[str, Any], parse_schema(compose(envelope, payload), _force=True))
                    fp = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
                    schema = MessageSchema(folder.name, kind, envelope_version, payload_version,
                                           parsed, bytes.fromhex(fp))
                    by_fingerprint[schema.fingerprint] = schema
                    by_type.setdefault(folder.name, []).append(schema)
    return Catalog(by_fingerprint, {name: tuple(schemas) for name, schemas in by_type.items()})
