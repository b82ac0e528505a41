"""Per-subject field encryption: the encrypt stage of the serialisation pipeline.

Fields marked ``"keel.personal": true`` in a payload schema are sealed with AES-256-GCM
under the data subject's key (the envelope's ``on_behalf_of``), a fresh 96-bit nonce per
field, and the tenant, subject, envelope id and field name as associated data, so a
ciphertext moved to another event, field, subject or tenant fails to open. A sealed value
is the self-describing string ``keel-enc:v1:<key-id>:<base64url(nonce || ciphertext)>``.
Opening a value whose key was erased gives ``ERASED`` (``⟨erased⟩``), never a silent null.
Nothing decrypted is cached: plaintext exists only in the envelope ``open`` returns. Data
keys are cached, briefly, by the key store (``KeyCache``), with their AES-GCM objects.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag

from keel.contracts.catalog import Catalog, load_catalog
from keel.domain.envelope import Envelope
from keel.domain.outcomes import derived_envelope, unvalidated_copy
from keel.domain.personal import ERASED, SEALED_PREFIX, is_sealed

__all__ = ["ERASED", "PREFIX", "FieldCipher", "is_sealed", "field_aad", "personal_fields"]
from keel.trust.errors import CorruptCiphertext, TrustError
from keel.trust.keystore import KeyStore

PREFIX = SEALED_PREFIX
_AAD_DOMAIN = b"keel.field.v1\x00"
_pack_len = struct.Struct(">I").pack
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_SEALED_KEY_ID = re.compile(re.escape(PREFIX.encode()) + rb"([0-9a-f]{32}):")
"""A sealed value's key id, as it stands in an encoded record (Avro writes a string's UTF-8 as is)."""


def personal_fields(message_type: str, catalog: Catalog | None = None) -> tuple[str, ...]:
    """The payload fields of ``message_type``'s current schema marked ``keel.personal``."""
    schema = (catalog or load_catalog()).latest(message_type).parsed
    [payload] = [f["type"] for f in schema["fields"] if f["name"] == "payload"]
    return tuple(f["name"] for f in payload["fields"] if f.get("keel.personal") is True)


def field_aad(tenant: str, subject: str, envelope_id: str, field: str) -> bytes:
    """What a field's ciphertext is bound to (length-prefixed, domain-separated).

    One join of the parts, not a generator of concatenations: 0.5 against 1.1 µs a field.
    """
    t, s, e, f = tenant.encode(), subject.encode(), envelope_id.encode(), field.encode()
    return b"".join((_AAD_DOMAIN, _pack_len(len(t)), t, _pack_len(len(s)), s, _pack_len(len(e)), e,
                     _pack_len(len(f)), f))


class FieldCipher:
    """Seals and opens the personal fields of envelopes against one key store."""

    def __init__(self, keys: KeyStore, catalog: Catalog | None = None) -> None:
        self.keys = keys
        self.catalog = catalog or load_catalog()
        self._personal: dict[str, tuple[str, ...]] = {}  # schema facts only, never values

    def personal(self, message_type: str) -> tuple[str, ...]:
        """The personal fields of ``message_type`` (memoised per cipher)."""
        if message_type not in self._personal:
            self._personal[message_type] = personal_fields(message_type, self.catalog)
        return self._personal[message_type]

    def prepare(self, envelopes: Iterable[Envelope]) -> None:
        """Fetch, or create, the keys ``seal`` will need for ``envelopes``, a few statements per tenant for all.

        Sealing a batch whose subjects are new would otherwise create their keys one
        statement (and one durable commit) at a time. The keys land in the key store's cache,
        where ``seal`` finds them; without a cache this only creates the missing ones.
        """
        for tenant, among in self._subjects(envelopes).items():
            self.keys.keys_for(tenant, among)

    def prepared(self, envelopes: Iterable[Envelope]) -> bool:
        """Whether ``seal`` finds every key ``envelopes`` need in the key store's cache: if not, it
        would ask the store, and create the keys of new subjects (a durable write each)."""
        return all(self.keys.cache.active(tenant, subject) is not None
                   for tenant, among in self._subjects(envelopes).items() for subject in among)

    def _subjects(self, envelopes: Iterable[Envelope]) -> defaultdict[str, set[str]]:
        """Per tenant, the data subjects of the plaintext personal fields of ``envelopes``."""
        subjects: defaultdict[str, set[str]] = defaultdict(set)
        for envelope in envelopes:
            names = self.personal(envelope.type)
            if names and envelope.on_behalf_of and any(
                    isinstance(value := getattr(envelope.payload, n, None), str) and not is_sealed(value)
                    for n in names):
                subjects[envelope.tenant_id].add(envelope.on_behalf_of)
        return subjects

    def prefetch(self, records: Iterable[bytes | None]) -> None:
        """Read the keys of the sealed values in these encoded ``records`` into the key store's cache.

        A batch of commands opened one by one would ask the store once per new subject; this
        asks once per few hundred. A hint only: text that merely looks sealed costs a look-up
        of a key that is not there, and ``open`` still checks every key it uses.
        """
        marker = PREFIX.encode()
        key_ids = {found.decode() for record in records if record and marker in record
                   for found in _SEALED_KEY_ID.findall(record)}
        if key_ids:
            self.keys.prefetch(key_ids)

    def seal(self, envelope: Envelope) -> Envelope:
        """``envelope`` with every plaintext personal field sealed under its subject's key."""
        return self._rewrite(envelope, self.seal_payload)

    def open(self, envelope: Envelope) -> Envelope:
        """``envelope`` with personal fields decrypted, or ``ERASED`` where the key was erased."""
        return self._rewrite(envelope, self.open_payload)

    def _rewrite(self, envelope: Envelope, transform: Callable[..., dict[str, Any]]) -> Envelope:
        """``envelope`` with its payload passed through ``transform``; the same object if nothing changed."""
        if not self.personal(envelope.type):  # most types have no personal field: no copy, no dump
            return envelope
        payload = envelope.payload.__dict__  # read only: ``transform`` returns a copy
        changed = transform(payload, tenant=envelope.tenant_id, subject=envelope.on_behalf_of,
                            envelope_id=str(envelope.id), message_type=envelope.type)
        if changed == payload:
            return envelope
        # Copies without validation, as ``model_copy`` would make them at a quarter of its cost: a
        # ciphertext need not match the plaintext's format rule.
        rewritten = unvalidated_copy(envelope.payload, changed, set(changed))
        return derived_envelope(envelope, {"payload": rewritten})

    def seal_payload(self, payload: Mapping[str, Any], *, tenant: str, subject: str | None, envelope_id: str,
                     message_type: str) -> dict[str, Any]:
        """The payload mapping with personal string fields sealed (for raw Avro records too)."""
        out = dict(payload)
        names = [n for n in self.personal(message_type)
                 if isinstance(out.get(n), str) and not is_sealed(out[n])]
        if not names:
            return out
        if not subject:
            raise TrustError(f"{message_type} carries personal data but names no data subject (on_behalf_of)",
                             code="personal_data_without_subject", field="on_behalf_of")
        key = self.keys.key_for(tenant, subject)
        cipher = key.aead
        for name in names:
            nonce = os.urandom(12)
            ct = cipher.encrypt(nonce, out[name].encode(), field_aad(tenant, subject, envelope_id, name))
            out[name] = f"{PREFIX}{key.key_id}:{base64.urlsafe_b64encode(nonce + ct).decode()}"
        return out

    def open_payload(self, payload: Mapping[str, Any], *, tenant: str, subject: str | None, envelope_id: str,
                     message_type: str) -> dict[str, Any]:
        """The payload mapping with sealed fields opened or shown as ``ERASED``."""
        out = dict(payload)
        for name in self.personal(message_type):
            if is_sealed(out.get(name)):
                out[name] = self._open(out[name], tenant, subject or "", envelope_id, name)
        return out

    def _open(self, value: str, tenant: str, subject: str, envelope_id: str, name: str) -> str:
        try:
            key_id, blob = value.removeprefix(PREFIX).split(":", 1)
            # ``base64.urlsafe_b64decode`` in one call instead of three frames (0.25 against 0.46 µs)
            data = binascii.a2b_base64(blob.encode().translate(_FROM_URLSAFE))
        except ValueError:
            raise CorruptCiphertext(f"payload.{name} is not a well-formed sealed value",
                                    field=f"payload.{name}") from None
        key = self.keys.lookup(tenant, key_id)
        if key is None:
            return ERASED
        if len(data) < 12 + 16:
            raise CorruptCiphertext(f"payload.{name} ciphertext is truncated", field=f"payload.{name}")
        try:
            return key.aead.decrypt(data[:12], data[12:], field_aad(tenant, subject, envelope_id, name)).decode()
        except InvalidTag:
            raise CorruptCiphertext(
                f"payload.{name} does not authenticate under key {key_id!r} for this tenant, subject, "
                "event and field (edited, or moved from elsewhere)", field=f"payload.{name}") from None
