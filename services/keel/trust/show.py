"""A readable trail from the audit chain: who did what, in what order, under whose authority.

Reads the records themselves (not the events topic), so the trail is exactly what the
verified chain says: the attribution fields, and the payload kept in each record's body.

A trail is the closure of what belongs to one story. It starts from the records of the
command (``--command``: caused by it, correlated with it) or of the subject (``--subject``:
done on their behalf), and follows, until nothing more joins, every record that

* was caused by or correlated with a command already on the trail, or
* names such a command in a payload field (any top-level field holding a command id:
  an approval's ``command_id``, a compensation's ``reverses``...).

A joining record brings its own causing command and the command ids its payload names,
so an approval brings in the approve command and the parked command it resumed, and the
compensation that undid a command joins through the id it names. No event type is named
here: whatever links by id is followed.

Each line shows when, who (actor, on behalf of, delegation), under what authority (role,
policy rule, approval id...), what (type, aggregate, version), what it names (command ids
in its payload), its personal fields and, from the payload, the approver, comment, reason or
code when it has them. A sealed value reads as the ``Reader`` shows it (``keel.trust.reveal``):
``⟨sealed⟩``, ``⟨erased⟩`` once its key is gone, or plaintext when revealed; never its ciphertext.
Compensations (the domain's compensating events) and erasure receipts are marked, so a
reader sees what undid what.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

from fastavro import schemaless_reader

from keel.contracts.catalog import load_catalog
from keel.contracts.codec import HEADER_SIZE, MAGIC
from keel.domain.personal import ERASED, SEALED, is_sealed
from keel.domains.registry import current
from keel.errors import KeelError
from keel.trust.entries import RECEIPT_MAGIC
from keel.trust.fields import personal_fields
from keel.trust.record import AuditEntry, AuditRecord, parse_record
from keel.trust.reveal import Reader

_NOTES = ("approver", "comment", "reason", "code")
"""Payload fields worth a reader's eye on every line (who decided, and why)."""
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TOKEN = re.compile(r"[\w.:@/-]+")


def select_trail(records: Iterable[bytes], *, command: str | None = None,
                 subject: str | None = None) -> list[AuditRecord]:
    """The records of ``command``'s story, or of everything done on behalf of ``subject``, in chain order."""
    parsed = [parse_record(raw) for raw in records]
    if command is not None:
        command = _canonical_id(command) or command
    ids: set[str] = set() if command is None else {command}
    chosen: set[int] = set()
    for index, record in enumerate(parsed):
        e = record.entry
        if (command is not None and command in (e.entry_id, e.causation_id, e.correlation_id)) \
                or (subject is not None and e.on_behalf_of == subject):
            chosen.add(index)
            ids |= _commands_of(record)
    growing = True
    while growing:  # links point either way (an approval names an earlier command), so repeat until settled
        growing = False
        for index, record in enumerate(parsed):
            if index not in chosen and _linked(record, ids):
                chosen.add(index)
                ids |= _commands_of(record)
                growing = True
    return [parsed[index] for index in sorted(chosen)]


def _linked(record: AuditRecord, ids: set[str]) -> bool:
    e = record.entry
    if e.causation_id in ids or e.correlation_id in ids:
        return True
    # Cheap first: only a body that holds one of the ids anywhere is decoded.
    if not any(m.decode() in ids for m in _UUID.findall(e.body)):
        return False
    return not ids.isdisjoint(references(e))


def _commands_of(record: AuditRecord) -> set[str]:
    """The command ids a record on the trail brings to it: its cause and what its payload names."""
    e = record.entry
    return ({e.causation_id} if e.causation_id else set()) | references(e)


def references(entry: AuditEntry) -> set[str]:
    """The ids held by the top-level fields of ``entry``'s payload (e.g. the command an approval is for)."""
    return {ref for value in payload_of(entry).values() if (ref := _canonical_id(value))}


def payload_of(entry: AuditEntry) -> dict[str, Any]:
    """The payload kept in ``entry``'s body: an event's Avro payload, a receipt's details; ``{}`` otherwise.

    Personal fields stay as they are stored (sealed); nothing is decrypted here.
    """
    body = entry.body
    try:
        if entry.kind == "event" and body[:2] == MAGIC:
            writer = load_catalog().writer(bytes(body[2:HEADER_SIZE]))
            message = cast(dict[str, Any], schemaless_reader(io.BytesIO(body[HEADER_SIZE:]), writer.parsed, None))
            payload = message.get("payload")
        elif entry.kind == "receipt" and body[:4] == RECEIPT_MAGIC:
            payload = json.loads(body[4:]).get("details")
        else:
            return {}
    except (KeelError, ValueError, KeyError, TypeError, EOFError, IndexError, AttributeError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _canonical_id(value: object) -> str | None:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str) and len(value) == 36:
        try:
            return str(uuid.UUID(value))
        except ValueError:
            return None
    return None


def render_trail(trail: list[AuditRecord], reader: Reader | None = None) -> list[str]:
    """One line per record, in chain order, sealed values as ``reader`` sees them (default: marked)."""
    if not trail:
        return ["(no audit records match)"]
    reader = reader or Reader(None)
    return [_line(r, reader) for r in trail]


def _line(record: AuditRecord, reader: Reader) -> str:
    e = record.entry
    when = ("?" if e.occurred_at_us is None
            else datetime.fromtimestamp(e.occurred_at_us / 1e6, UTC).isoformat(timespec="seconds"))
    chain = " -> ".join(f"{link['actor']['kind']}:{link['actor']['id']}" + (f" ({link['reason']})"
                                                                          if link.get("reason") else "")
                        for link in json.loads(e.delegation or "[]"))
    authority = ", ".join(f"{k}={v}" for k, v in sorted(json.loads(e.authority or "{}").items()) if v)
    parts = [f"#{record.seq} {when} {e.actor or '?'}"]
    if e.on_behalf_of:
        parts.append(f"on behalf of {e.on_behalf_of}")
    if chain:
        parts.append(f"via {chain}")
    parts.append(f"[{authority or 'no authority recorded'}]")
    target = f" {e.aggregate_id}" + (f" v{e.version}" if e.version else "") if e.aggregate_id else ""
    parts.append(f"{e.type}{target}")
    event = e.kind == "event"
    payload = reader.payload(payload_of(e), message_type=e.type if event else None, tenant=e.tenant,
                             subject=e.on_behalf_of, entry_id=e.entry_id, command_id=e.causation_id or e.entry_id)
    parts += [f"{name}={ref}" for name, value in payload.items() if (ref := _canonical_id(value))]
    parts += [f"{name}={_shown(payload[name])}" for name in (_personal(e.type) if event else ())
              if name not in _NOTES and payload.get(name) not in (None, "")]
    parts += [f"{name}={_shown(payload[name])}" for name in _NOTES if payload.get(name) not in (None, "")]
    if e.type == "SubjectErased" or e.type in current().compensating:
        parts.append("<- undoes earlier actions")
    if e.causation_id:
        parts.append(f"(caused by {e.causation_id})")
    return " ".join(parts)


def _personal(message_type: str) -> tuple[str, ...]:
    """The personal fields of an event type; none for a type the catalog does not know."""
    try:
        return personal_fields(message_type)
    except KeelError:
        return ()


def _shown(value: object) -> str:
    if is_sealed(value):  # the reader marked every sealed value; this holds even if one slipped past
        return SEALED
    if value in (ERASED, SEALED) or not isinstance(value, str) or _TOKEN.fullmatch(value):
        return str(value)
    return json.dumps(value, ensure_ascii=False)  # free text, quoted so it cannot pass for another field
