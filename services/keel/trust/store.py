"""Where a tenant's audit lives: the Kafka audit and checkpoint topics, and export files.

An export is JSON lines, one ``{"record": "<base64 KAR1 bytes>"}`` per record in chain
order and one ``{"checkpoint": {...}}`` per signed checkpoint. Kept outside the system,
its checkpoints are trusted anchors that a rewritten or truncated Kafka log cannot move.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from keel.config import Settings
from keel.errors import DeliveryError
from keel.kafka.clients import producer_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.trust.checkpoints import Checkpoint
from keel.trust.entries import encode_receipt
from keel.trust.errors import AuditFormatError


@dataclass(frozen=True)
class TenantAudit:
    """One tenant's records (in log order) and checkpoints."""

    tenant: str
    records: list[bytes]
    checkpoints: list[Checkpoint]


def read_audit(settings: Settings, tenant: str) -> TenantAudit:
    """Every committed record and checkpoint keyed ``tenant`` (its key is the chain it claims)."""
    key = tenant.encode()
    records = [m.value() or b"" for m in read_to_end(settings, topic_name(settings, Topic.AUDIT)) if m.key() == key]
    checkpoints = [Checkpoint.from_json(m.value() or b"")
                   for m in read_to_end(settings, topic_name(settings, Topic.AUDIT_CHECKPOINTS)) if m.key() == key]
    return TenantAudit(tenant, records, checkpoints)


def export_audit(audit: TenantAudit, path: Path) -> int:
    """Write ``audit`` as JSON lines to ``path``; returns the number of lines."""
    lines = [json.dumps({"record": base64.b64encode(r).decode()}) for r in audit.records]
    lines += [json.dumps({"checkpoint": json.loads(c.to_json())}) for c in audit.checkpoints]
    path.write_text("".join(f"{line}\n" for line in lines))
    return len(lines)


def read_export(path: Path, tenant: str) -> TenantAudit:
    """The records and checkpoints of an export file (or a file of checkpoints only).

    A line that is not a record or a checkpoint is an ``AuditFormatError`` naming ``path:line``.
    """
    records: list[bytes] = []
    checkpoints: list[Checkpoint] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            if "record" in doc:
                records.append(base64.b64decode(doc["record"], validate=True))
            else:
                checkpoints.append(Checkpoint.from_json(json.dumps(doc.get("checkpoint", doc))))
        except AuditFormatError as exc:
            raise AuditFormatError(f"{path}:{number}: {exc.message}") from exc
        except (ValueError, TypeError) as exc:
            raise AuditFormatError(f"{path}:{number}: not an audit export line: {exc}") from exc
    return TenantAudit(tenant, records, checkpoints)


def append_receipt(settings: Settings, *, tenant: str, type: str, actor: str, details: dict[str, Any],
                   on_behalf_of: str | None = None, authority: dict[str, Any] | None = None,
                   receipt_id: uuid.UUID | None = None, occurred_at: datetime | None = None) -> uuid.UUID:
    """Append a non-event audit entry (``SubjectErased``, ``IsolationViolation``...) via the intake.

    The chainer links it into ``tenant``'s chain like any event. Returns the receipt id.
    """
    rid = receipt_id or uuid.uuid4()
    produce_raw(settings, Topic.AUDIT_INTAKE, [(tenant.encode(), encode_receipt(
        tenant=tenant, type=type, receipt_id=rid, actor=actor, details=details, on_behalf_of=on_behalf_of,
        authority=authority, occurred_at=occurred_at))])
    return rid


def produce_raw(settings: Settings, topic: Topic, items: Iterable[tuple[bytes, bytes]],
                partition: int | None = None) -> None:
    """Produce ``(key, value)`` pairs with an idempotent producer and wait for every ack."""
    producer = Producer(producer_config(settings))
    failed: list[str] = []
    for key, value in items:
        producer.produce(topic_name(settings, topic), value, key, partition=-1 if partition is None else partition,
                         on_delivery=lambda err, _m: failed.append(str(err)) if err else None)
    if producer.flush(30) or failed:
        raise DeliveryError(f"audit produce not acknowledged: {failed[:1] or 'timeout'}")
