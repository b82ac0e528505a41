"""Crypto-shredding a data subject: delete their keys, audit a receipt, redact projected ciphertext.

Order matters: the keys go first (the erasure itself), then the ``SubjectErased`` receipt
is produced to the audit intake and chained like any event, so the audit says what was
erased, when and by whom. If the receipt cannot be produced the command fails loudly after
the keys are gone; re-run it to record the receipt. The chain is untouched: it covers ciphertext.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keel.config import Settings
from keel.trust.erased import SEALED_VALUE
from keel.trust.fields import ERASED
from keel.trust.keystore import KeyStore
from keel.trust.store import append_receipt

RECEIPT_TYPE = "SubjectErased"


@dataclass(frozen=True)
class ErasureReceipt:
    """What was erased, when, by whom: the body of the ``SubjectErased`` audit entry."""

    receipt_id: uuid.UUID
    tenant: str
    subject: str
    key_ids: tuple[str, ...]
    erased_at: datetime
    erased_by: str
    reason: str


def erase_subject(settings: Settings, keys: KeyStore, *, tenant: str, subject: str, actor: str,
                  reason: str) -> ErasureReceipt:
    """Delete ``subject``'s data keys and append a ``SubjectErased`` receipt to the tenant's audit."""
    erased = keys.erase(tenant, subject, actor)
    receipt = ErasureReceipt(uuid.uuid4(), tenant, subject, tuple(erased), datetime.now(UTC), actor, reason)
    details: dict[str, Any] = {"subject": subject, "key_ids": list(receipt.key_ids), "reason": reason,
                               "erased_at": receipt.erased_at.isoformat()}
    append_receipt(settings, tenant=tenant, type=RECEIPT_TYPE, actor=actor, details=details,
                   on_behalf_of=subject, authority={"reason": reason}, receipt_id=receipt.receipt_id,
                   occurred_at=receipt.erased_at)
    return receipt


def redaction_sql(table: str = "events") -> str:
    """A ClickHouse mutation that replaces a subject's sealed values in projected payloads by ``ERASED``.

    Parameters ``{tenant:String}`` and ``{subject:String}``; run it with the projector's client
    after ``erase_subject`` so existing rows say ``⟨erased⟩`` rather than hold dead ciphertext.
    Rows projected or replayed later read the same by themselves (``keel.trust.erased``).
    """
    return (f"ALTER TABLE {table} UPDATE payload = replaceRegexpAll(payload, '{SEALED_VALUE}', "
            f"'{ERASED}') WHERE tenant_id = {{tenant:String}} AND on_behalf_of = {{subject:String}} "
            "SETTINGS mutations_sync = 1")
