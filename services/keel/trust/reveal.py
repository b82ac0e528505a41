"""How a person reads a personal value: the one rule of every output a person reads.

Personal fields are stored sealed (``keel-enc:v1:<key-id>:…``) everywhere. Ciphertext tells a
reader nothing and only gets copied on, so no output a person reads shows it
(``GET /v1/commands/{id}``, ``keel state``, ``keel audit show``, ``keel replay`` to a JSON-lines
file). A sealed value reads as

* its plaintext, to a reader allowed to see personal data (``reveal``: an API key with the
  ``personal_data`` role, an operator's ``--reveal --as kind:id``);
* ``⟨erased⟩`` when its key was erased (the key store's tombstone says so);
* ``⟨sealed⟩`` otherwise.

Only a personal field is ever opened, as only there is its associated data known (tenant,
subject, entry id, field); a sealed value anywhere else (inside JSON text, in a receipt's
details) is only marked. A reader remembers what it showed in plaintext, per tenant and
subject, until its caller takes it (``take``) and records the read in those tenants' audit
chains (``record_reads``: ``PersonalDataRead``) before the output leaves.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from keel.bootstrap import trust_settings
from keel.config import Settings
from keel.domain.envelope import Envelope
from keel.domain.personal import ERASED, SEALED, SEALED_PREFIX, is_sealed
from keel.errors import ConfigError, KeelError
from keel.kafka.topics import Topic
from keel.trust.entries import encode_receipt
from keel.trust.erased import CIPHERTEXT, KEY_ID
from keel.trust.errors import UnknownKey
from keel.trust.fields import FieldCipher
from keel.trust.keystore import open_keystore
from keel.trust.store import produce_raw

PERSONAL_DATA_ROLE = "personal_data"
"""The role of an API key whose reads of ``GET /v1/commands/{id}`` show personal fields in plaintext."""
PERSONAL_DATA_READ = "PersonalDataRead"
"""The audit receipt of a read that showed personal values in plaintext."""

_SEALED = re.compile(f"{SEALED_PREFIX}({KEY_ID})?:?(?:{CIPHERTEXT})?")  # a cut value is marked too

Produce = Callable[[Settings, Topic, Iterable[tuple[bytes, bytes]]], None]


@dataclass(frozen=True)
class Disclosure:
    """One subject's personal values shown in plaintext: per command they belong to, which fields."""

    tenant: str
    subject: str
    fields: Mapping[str, frozenset[str]]

    def details(self, via: str) -> dict[str, Any]:
        """The receipt's details; one command is named ``command_id``, so the read joins that command's trail."""
        commands = sorted(self.fields)
        named: dict[str, Any] = {"command_id": commands[0]} if len(commands) == 1 else {"command_ids": commands}
        return {"via": via, **named, "fields": sorted(set().union(*self.fields.values()))}


class Reader:
    """Personal values as one reader sees them; without a cipher no key store is configured (all ``⟨sealed⟩``).

    A reader serves one read: whether a key is erased is asked once, so a key erased while it
    reads may still show ``⟨sealed⟩`` (never plaintext: opening asks the key store each time).
    """

    def __init__(self, cipher: FieldCipher | None, *, reveal: bool = False) -> None:
        if reveal and cipher is None:
            raise ConfigError("revealing personal data needs the key store: set KEEL_MASTER_KEY_FILE",
                              code="master_key_missing")
        self.cipher, self.reveal = cipher, reveal
        self._erased: dict[str, bool] = {}
        self._shown: dict[tuple[str, str], dict[str, set[str]]] = {}

    def envelope(self, envelope: Envelope) -> Envelope:
        """``envelope`` with its payload as this reader sees it; the same object when nothing changes."""
        command = envelope.id if envelope.payload.kind == "command" else envelope.causation_id or envelope.id
        payload = envelope.payload.__dict__  # read only, as ``FieldCipher`` does
        shown = self.payload(payload, message_type=envelope.type, tenant=envelope.tenant_id,
                             subject=envelope.on_behalf_of, entry_id=str(envelope.id), command_id=str(command))
        changed = {name: value for name, value in shown.items() if value != payload[name]}
        if not changed:
            return envelope
        # model_copy skips validation, as sealing does: a marker or a plaintext needs none here
        return envelope.model_copy(update={"payload": envelope.payload.model_copy(update=changed)})

    def payload(self, payload: Mapping[str, Any], *, message_type: str | None, tenant: str, subject: str | None,
                entry_id: str, command_id: str) -> dict[str, Any]:
        """A payload mapping as this reader sees it.

        ``message_type`` ``None`` (a receipt's details): nothing is opened. ``subject`` ``None``
        (a record that does not keep it): the subject of the key that sealed the value, as a
        key serves one subject. ``command_id`` is what a revealed value is recorded under.
        """
        opening = self._personal(message_type) if self.reveal else ()
        sealed = [name for name in opening if is_sealed(payload.get(name))]
        out = {name: value if name in sealed else self.masked(value) for name, value in payload.items()}
        if not sealed or self.cipher is None or message_type is None:
            return out
        subject = subject or self._subject(payload[sealed[0]])
        opened = self.cipher.open_payload({name: payload[name] for name in sealed}, tenant=tenant, subject=subject,
                                          envelope_id=entry_id, message_type=message_type)
        out.update(opened)
        if shown := [name for name in sealed if opened[name] != ERASED]:
            self._shown.setdefault((tenant, subject), {}).setdefault(command_id, set()).update(shown)
        return out

    def masked(self, value: Any) -> Any:
        """``value`` (text, or mappings and sequences of it) with every sealed value in it marked, never opened."""
        if isinstance(value, str):
            if SEALED_PREFIX not in value:
                return value
            erased = self._erased_among({found[1] for found in _SEALED.finditer(value) if found[1]})
            return _SEALED.sub(lambda found: ERASED if found[1] in erased else SEALED, value)
        if isinstance(value, Mapping):
            return {key: self.masked(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.masked(item) for item in value)
        return value

    def take(self) -> list[Disclosure]:
        """What this reader showed in plaintext since the last ``take``, one per tenant and subject."""
        taken = [Disclosure(tenant, subject, {command: frozenset(fields) for command, fields in reads.items()})
                 for (tenant, subject), reads in sorted(self._shown.items())]
        self._shown = {}
        return taken

    def _personal(self, message_type: str | None) -> tuple[str, ...]:
        if self.cipher is None or message_type is None:
            return ()
        try:
            return self.cipher.personal(message_type)
        except KeelError:  # a type the catalog no longer knows: its values are marked, not opened
            return ()

    def _subject(self, value: str) -> str:
        key_id = value.removeprefix(SEALED_PREFIX).partition(":")[0]
        assert self.cipher is not None
        row = self.cipher.keys.tombstone(key_id)
        if row is None:
            raise UnknownKey(f"no data key {key_id!r} in the key store", field="key_id")
        return row.subject

    def _erased_among(self, key_ids: set[str]) -> frozenset[str]:
        if self.cipher is not None and (unknown := key_ids - self._erased.keys()):
            erased = self.cipher.keys.erased(unknown)
            self._erased.update({key_id: key_id in erased for key_id in unknown})
        return frozenset(key_id for key_id in key_ids if self._erased.get(key_id))


def holds_sealed(value: Any) -> bool:
    """Whether ``value`` (text, or mappings and sequences of it) holds a sealed value: a cheap test before reading."""
    if isinstance(value, str):
        return SEALED_PREFIX in value
    if isinstance(value, Mapping):
        return any(holds_sealed(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(holds_sealed(item) for item in value)
    return False


def record_reads(settings: Settings, reads: Sequence[Disclosure], *, actor: str, via: str,
                 authority: dict[str, Any] | None = None, produce: Produce = produce_raw) -> None:
    """Append a ``PersonalDataRead`` receipt per tenant and subject read (on behalf of that subject, so
    ``keel audit show --subject`` lists who read their data), in one produce; raises unless acknowledged."""
    if reads:
        produce(settings, Topic.AUDIT_INTAKE, [(read.tenant.encode(), encode_receipt(
            tenant=read.tenant, type=PERSONAL_DATA_READ, receipt_id=uuid.uuid4(), actor=actor,
            details=read.details(via), on_behalf_of=read.subject, authority=authority)) for read in reads])


@contextmanager
def open_reader(settings: Settings, *, reveal: bool = False) -> Iterator[Reader]:
    """A reader on the configured key store (``KEEL_MASTER_KEY_FILE``, ``KEEL_KEYSTORE_DSN``).

    Without a master key there is no key store to ask: sealed values read ``⟨sealed⟩``, and
    revealing is refused (``master_key_missing``).
    """
    trust = trust_settings(settings)
    if trust.master_key_file is None:
        yield Reader(None, reveal=reveal)
        return
    with open_keystore(settings, trust) as keys:
        yield Reader(FieldCipher(keys), reveal=reveal)
