"""A readable trail from the audit chain: who did what, in what order, under whose authority.

Reads the attribution fields of the records themselves (not the events topic), so the
trail is exactly what the verified chain says. Compensations (the domain's compensating
events, which share the correlation id of what they undo) and erasure receipts are
marked, so a reader sees what undid what.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime

from keel.domain.subscription import COMPENSATING_EVENTS
from keel.trust.record import AuditRecord, parse_record

_UNDOING = COMPENSATING_EVENTS | {"SubjectErased"}


def select_trail(records: Iterable[bytes], *, command: str | None = None,
                 subject: str | None = None) -> list[AuditRecord]:
    """The records caused by or correlated with ``command``, or done on behalf of ``subject``."""
    chosen = []
    for raw in records:
        record = parse_record(raw)
        e = record.entry
        if command is not None and command in (e.entry_id, e.causation_id, e.correlation_id):
            chosen.append(record)
        elif subject is not None and e.on_behalf_of == subject:
            chosen.append(record)
    return chosen


def render_trail(trail: list[AuditRecord]) -> list[str]:
    """One line per record, in chain order."""
    if not trail:
        return ["(no audit records match)"]
    return [_line(r) for r in trail]


def _line(record: AuditRecord) -> str:
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
    if e.type in _UNDOING:
        parts.append("<- undoes earlier actions")
    if e.causation_id:
        parts.append(f"(caused by {e.causation_id})")
    return " ".join(parts)
