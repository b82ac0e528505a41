"""Values sealed under an erased key read as ``⟨erased⟩`` wherever records are projected or replayed again.

Erasing a subject redacts the live projection (``redaction_sql``), but Kafka keeps the
ciphertext, so a rebuild, a replay or a projector that lags behind would bring the dead
ciphertext back. Everything that writes records out again asks, once per batch, which of
the keys its sealed values name are erased. The key store keeps a tombstone for every
erased key, so the answer needs no ciphertext opened and no key unwrapped, and values
under live keys stay sealed exactly as they are. Key ids are unique across tenants.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

from keel.domain.envelope import Envelope
from keel.domain.personal import ERASED, SEALED_PREFIX

KEY_ID = "[A-Za-z0-9]+"
CIPHERTEXT = "[A-Za-z0-9_=-]+"  # base64url
SEALED_VALUE = f"{SEALED_PREFIX}{KEY_ID}:{CIPHERTEXT}"  # the same in Python's re and ClickHouse's RE2

_SEALED = re.compile(f"{SEALED_PREFIX}({KEY_ID}):{CIPHERTEXT}")
_NAMED = re.compile(f"{SEALED_PREFIX}({KEY_ID}):".encode())


class Tombstones(Protocol):
    """The key store as erasure sees it (``KeyStore.erased``)."""

    def erased(self, key_ids: Collection[str]) -> frozenset[str]:
        """Which of ``key_ids`` were erased."""


@dataclass(frozen=True)
class Erased:
    """The erased keys among those a batch names, and how each output replaces their values."""

    key_ids: frozenset[str] = frozenset()

    def text(self, text: str) -> str:
        """``text`` (one value, or JSON) with every value sealed under an erased key as ``ERASED``."""
        if not self.key_ids or SEALED_PREFIX not in text:
            return text
        return _SEALED.sub(lambda found: ERASED if found[1] in self.key_ids else found[0], text)

    def envelope(self, envelope: Envelope) -> Envelope:
        """``envelope`` with such payload values replaced; the same object when it holds none."""
        if not self.key_ids:
            return envelope
        changed = {name: redacted for name, value in envelope.payload.__dict__.items()
                   if isinstance(value, str) and (redacted := self.text(value)) != value}
        if not changed:
            return envelope
        # model_copy skips validation, as sealing does: ERASED passes every personal field's rule anyway
        return envelope.model_copy(update={"payload": envelope.payload.model_copy(update=changed)})

    def sql(self, expression: str) -> str:
        """A ClickHouse expression: the String ``expression`` with such values replaced."""
        if not self.key_ids:
            return expression
        keys = "|".join(sorted(self.key_ids))  # key ids match KEY_ID: nothing to quote
        return f"replaceRegexpAll({expression}, '{SEALED_PREFIX}(?:{keys}):{CIPHERTEXT}', '{ERASED}')"


class Erasures:
    """Asks the key store which keys a batch names are erased; remembers the erased ones (erasure is final)."""

    def __init__(self, tombstones: Tombstones | None) -> None:
        self._tombstones = tombstones  # None: no key store is configured, none to ask
        self._erased: set[str] = set()

    def among(self, records: Iterable[bytes | str]) -> Erased:
        """The erased keys among those named by sealed values in ``records`` (record bytes or JSON text)."""
        if self._tombstones is None:
            return Erased()
        named = {key.decode() for record in records
                 for key in _NAMED.findall(record.encode() if isinstance(record, str) else record)}
        if unknown := named - self._erased:  # a live key may have been erased since: ask again
            self._erased |= self._tombstones.erased(unknown)
        return Erased(frozenset(named & self._erased))
