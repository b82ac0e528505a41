"""Typed errors of the trust slice, each with a stable machine-readable ``code``.

They subclass ``keel.errors.KeelError`` so the CLI prints them as ``[code] message``.
"""

from __future__ import annotations

from keel.errors import KeelError


class TrustError(KeelError):
    """Base of every audit, signing and encryption failure."""

    code = "trust_error"


class AuditFormatError(TrustError):
    """Bytes on the audit topic or in an export are not an audit record or checkpoint."""

    code = "audit_format"


class UnknownSigningKey(TrustError):
    """A checkpoint names a signing key id that is not in the trusted key set."""

    code = "unknown_signing_key"


class BadSignature(TrustError):
    """A checkpoint signature does not verify under the key it names."""

    code = "bad_signature"


class UnknownKey(TrustError):
    """A ciphertext names a data key id the key store has never held."""

    code = "unknown_key"


class WrongTenantKey(TrustError):
    """A data key or ciphertext belongs to another tenant."""

    code = "wrong_tenant_key"


class CorruptCiphertext(TrustError):
    """A personal field's ciphertext is malformed or fails authentication (edited, swapped, wrong AAD)."""

    code = "corrupt_ciphertext"


class KeyUnwrapFailed(TrustError):
    """A wrapped data key does not open under the tenant master key (wrong master key or tampered row)."""

    code = "key_unwrap_failed"
