"""A third domain, written the way a team would write it: agents changing DNS records.

Nothing here is imported by the test process: ``write_domain`` writes the package
``team_dns`` (models, a pure aggregate, undo, default policy, a ClickHouse view) into a
folder outside the repository, and Keel's processes find it through ``KEEL_DOMAINS`` and
``PYTHONPATH`` only. ``tests/e2e/test_third_domain.py`` drives it end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

PACKAGE = "team_dns"
DOMAIN = "dns"
VIEW = "dns_records"
RULE = "short-ttls-need-an-admin"

_INIT = '''\
"""DNS: agents set and delete the records of a zone; an admin approves short TTLs."""

from __future__ import annotations

from pathlib import Path

from keel.domains import Aggregate, Domain, Match, Outcome, Rule, Undo

from team_dns import zone
from team_dns.messages import (
    DeleteRecord, RecordDeleted, RecordRestored, RecordSet, RestoreRecord, SetRecord,
)

zones = Aggregate(
    name="zone",
    initial=zone.INITIAL,
    commands=(SetRecord, DeleteRecord, RestoreRecord),
    events=(RecordSet, RecordDeleted, RecordRestored),
    decide=zone.decide,
    evolve=zone.evolve,
    id_pattern=r"[a-z0-9][a-z0-9.-]{0,252}",
)


def _restore(event, reason):
    return RestoreRecord(undoes=event.causation_id, reason=reason)


domain = Domain(
    name="dns",
    home=Path(__file__).parent,
    aggregates=(zones,),
    undo={
        RecordSet: Undo(by=RecordRestored, command=_restore, names_undone="undoes"),
        RecordDeleted: Undo(by=RecordRestored, command=_restore, names_undone="undoes"),
    },
    policy=(
        # A short TTL spreads a bad record fast and wide: an admin looks first.
        Rule(name="short-ttls-need-an-admin",
             match=Match(command_types=frozenset({"SetRecord"}), payload={"ttl": {"lt": 60}}),
             decision=Outcome.APPROVE),
        # Nobody deletes the zone apex unattended.
        Rule(name="apex-deletes-need-an-admin",
             match=Match(command_types=frozenset({"DeleteRecord"}), payload={"name": {"in": ["@"]}}),
             decision=Outcome.APPROVE),
    ),
    views=("dns_records",),
)
'''

_MESSAGES = '''\
"""The commands and events of a DNS zone."""

from __future__ import annotations

import uuid

from pydantic import Field

from keel.domains import Command, Event

_Name = Field(pattern=r"^(@|[a-z0-9_]([a-z0-9_-]{0,62})(\\.[a-z0-9_-]{1,63})*)$")
_Reason = Field(min_length=1, max_length=500)


class SetRecord(Command):
    """Create or change a record of the zone."""

    name: str = _Name
    value: str = Field(min_length=1, max_length=255)
    ttl: int = Field(ge=1, le=86_400)


class DeleteRecord(Command):
    """Remove a record of the zone."""

    name: str = _Name
    reason: str = _Reason


class RestoreRecord(Command):
    """Put a record back as it was before a command: the compensation of a set or a delete."""

    undoes: uuid.UUID
    reason: str = _Reason


class RecordSet(Event):
    name: str
    value: str
    ttl: int
    previous_value: str | None = None
    previous_ttl: int | None = None


class RecordDeleted(Event):
    name: str
    value: str
    ttl: int
    reason: str


class RecordRestored(Event):
    name: str
    value: str | None = None
    ttl: int | None = None
    reason: str
    undoes: uuid.UUID
'''

_ZONE = '''\
"""A zone as pure functions: what a command yields, and the zone after an event."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

from keel.domains import Envelope, Event, Rejected

from team_dns.messages import (
    DeleteRecord, RecordDeleted, RecordRestored, RecordSet, RestoreRecord, SetRecord,
)


@dataclass(frozen=True)
class Record:
    value: str
    ttl: int


@dataclass(frozen=True)
class Before:
    """A record as it was before a command changed it (``None``: it did not exist)."""

    name: str
    record: Record | None


@dataclass(frozen=True)
class Zone:
    records: dict[str, Record] = field(default_factory=dict)
    undoable: dict[uuid.UUID, Before] = field(default_factory=dict)
    """What each standing change replaced, by the id of the command that made it."""


INITIAL = Zone()


def decide(state: Zone, command: Envelope) -> list[Event]:
    match command.payload:
        case SetRecord() as set_:
            old = state.records.get(set_.name)
            if old == Record(set_.value, set_.ttl):
                raise Rejected("unchanged", f"{set_.name} already is {set_.value} (ttl {set_.ttl})")
            return [RecordSet(name=set_.name, value=set_.value, ttl=set_.ttl,
                              previous_value=old.value if old else None, previous_ttl=old.ttl if old else None)]
        case DeleteRecord() as delete:
            old = state.records.get(delete.name)
            if old is None:
                raise Rejected("no_such_record", f"{command.aggregate_id} has no record {delete.name}")
            return [RecordDeleted(name=delete.name, value=old.value, ttl=old.ttl, reason=delete.reason)]
        case RestoreRecord() as restore:
            before = state.undoable.get(restore.undoes)
            if before is None:
                raise Rejected("nothing_to_restore", f"command {restore.undoes} changed nothing still standing")
            return [RecordRestored(name=before.name, value=before.record.value if before.record else None,
                                   ttl=before.record.ttl if before.record else None, reason=restore.reason,
                                   undoes=restore.undoes)]
    raise Rejected("unsupported_command", f"{command.type} is not a zone command")


def evolve(state: Zone, event: Envelope) -> Zone:
    records, undoable = dict(state.records), dict(state.undoable)
    match event.payload:
        case RecordSet() as set_:
            previous = Record(set_.previous_value, set_.previous_ttl) if set_.previous_value is not None else None
            records[set_.name] = Record(set_.value, set_.ttl)
            undoable = {k: v for k, v in undoable.items() if v.name != set_.name}
            if event.causation_id is not None:
                undoable[event.causation_id] = Before(set_.name, previous)
        case RecordDeleted() as deleted:
            records.pop(deleted.name, None)
            undoable = {k: v for k, v in undoable.items() if v.name != deleted.name}
            if event.causation_id is not None:
                undoable[event.causation_id] = Before(deleted.name, Record(deleted.value, deleted.ttl))
        case RecordRestored() as restored:
            if restored.value is None:
                records.pop(restored.name, None)
            else:
                records[restored.name] = Record(restored.value, restored.ttl or 0)
            undoable = {k: v for k, v in undoable.items() if v.name != restored.name}
        case _:
            return state
    return replace(state, records=records, undoable=undoable)
'''

# The current value of every record, per tenant and zone; a deleted record has no value.
# (tuple(...) keeps argMax from skipping a NULL value.)
_VIEW_SQL = '''\
-- The DNS records of every zone as they stand now, and the change that made each.
CREATE VIEW IF NOT EXISTS dns_records AS
SELECT
    tenant_id,
    aggregate_id AS zone,
    JSONExtractString(payload, 'name') AS name,
    argMax(tuple(if(type = 'RecordDeleted', NULL, JSONExtract(payload, 'value', 'Nullable(String)'))),
           assumeNotNull(version)).1 AS value,
    argMax(tuple(if(type = 'RecordDeleted', NULL, JSONExtract(payload, 'ttl', 'Nullable(Int64)'))),
           assumeNotNull(version)).1 AS ttl,
    argMax(type, assumeNotNull(version)) AS last_change,
    count() AS changes
FROM events FINAL
WHERE type IN ('RecordSet', 'RecordDeleted', 'RecordRestored')
GROUP BY tenant_id, zone, name
'''


def _uuid() -> dict[str, str]:
    return {"type": "string", "logicalType": "uuid"}


def _record(kind: str, name: str, fields: list[tuple[str, object]]) -> dict[str, object]:
    def field(field_name: str, avro: object) -> dict[str, object]:
        if isinstance(avro, list):  # optional: ["null", T] defaults to null
            return {"name": field_name, "type": avro, "default": None}
        return {"name": field_name, "type": avro}

    return {"type": "record", "name": name, "namespace": f"{DOMAIN}.{kind}",
            "fields": [field(n, t) for n, t in fields]}


SCHEMAS: dict[tuple[str, str], dict[str, object]] = {
    ("commands", "SetRecord"): _record("commands", "SetRecord", [("name", "string"), ("value", "string"),
                                                                 ("ttl", "long")]),
    ("commands", "DeleteRecord"): _record("commands", "DeleteRecord", [("name", "string"), ("reason", "string")]),
    ("commands", "RestoreRecord"): _record("commands", "RestoreRecord", [("undoes", _uuid()),
                                                                         ("reason", "string")]),
    ("events", "RecordSet"): _record("events", "RecordSet", [
        ("name", "string"), ("value", "string"), ("ttl", "long"),
        ("previous_value", ["null", "string"]), ("previous_ttl", ["null", "long"])]),
    ("events", "RecordDeleted"): _record("events", "RecordDeleted", [
        ("name", "string"), ("value", "string"), ("ttl", "long"), ("reason", "string")]),
    ("events", "RecordRestored"): _record("events", "RecordRestored", [
        ("name", "string"), ("value", ["null", "string"]), ("ttl", ["null", "long"]), ("reason", "string"),
        ("undoes", _uuid())]),
}
"""The Avro schemas of the domain, as ``keel schemas freeze`` would write them from the models."""


def write_domain(root: Path, *, schemas: bool = True) -> Path:
    """Write the ``team_dns`` package under ``root`` (a folder for PYTHONPATH); returns the package folder.

    ``schemas=False`` leaves ``schemas/`` for ``keel schemas freeze`` to write.
    """
    package = root / PACKAGE
    files = {
        "__init__.py": _INIT,
        "messages.py": _MESSAGES,
        "zone.py": _ZONE,
        f"projections/{VIEW}/001_create_{VIEW}.sql": _VIEW_SQL,
    }
    if schemas:
        files.update({f"schemas/{kind}/{name}/v1.avsc": json.dumps(schema, indent=1) + "\n"
                      for (kind, name), schema in SCHEMAS.items()})
    for relative, text in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package
