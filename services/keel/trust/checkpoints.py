"""Signed checkpoints: a tenant's chain head (tenant, seq, hash) signed with Ed25519.

The signed message is ``b"keel.audit.checkpoint.v1\\x00"`` + length-prefixed tenant + u64
seq + 32-byte hash + length-prefixed key id + u64 signing time (µs). A checkpoint travels
as one JSON object (topic value, export line). Rotation: a new key gets a new id; its public
key joins the trusted set beside the old ones, so checkpoints signed by any of them verify.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from keel.errors import ConfigError
from keel.trust.errors import AuditFormatError, BadSignature, UnknownSigningKey
from keel.trust.settings import TrustSettings

DOMAIN = b"keel.audit.checkpoint.v1\x00"
_U32, _U64 = struct.Struct(">I"), struct.Struct(">Q")


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: tenant's record ``seq`` has hash ``head``."""

    tenant: str
    seq: int
    head: bytes
    key_id: str
    signed_at_us: int
    signature: bytes

    def message(self) -> bytes:
        """The exact bytes the signature covers."""
        return signed_message(self.tenant, self.seq, self.head, self.key_id, self.signed_at_us)

    def to_json(self) -> str:
        """One line of JSON, for the checkpoints topic and export files."""
        return json.dumps({"v": 1, "tenant": self.tenant, "seq": self.seq, "hash": self.head.hex(),
                           "key_id": self.key_id, "signed_at_us": self.signed_at_us,
                           "signature": base64.b64encode(self.signature).decode()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Checkpoint:
        """Parse a checkpoint; raises ``AuditFormatError`` when it is not one."""
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            if doc.get("v") != 1:
                raise ValueError(f"unsupported checkpoint version {doc.get('v')!r}")
            return cls(str(doc["tenant"]), int(doc["seq"]), bytes.fromhex(doc["hash"]), str(doc["key_id"]),
                       int(doc["signed_at_us"]), base64.b64decode(doc["signature"], validate=True))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditFormatError(f"not a checkpoint: {exc}") from exc


def signed_message(tenant: str, seq: int, head: bytes, key_id: str, signed_at_us: int) -> bytes:
    """The domain-separated, length-prefixed bytes a checkpoint signature covers."""
    t, k = tenant.encode(), key_id.encode()
    return b"".join([DOMAIN, _U32.pack(len(t)), t, _U64.pack(seq), head, _U32.pack(len(k)), k,
                     _U64.pack(signed_at_us)])


@dataclass(frozen=True)
class CheckpointSigner:
    """Signs chain heads with one private key and its id."""

    key_id: str
    key: Ed25519PrivateKey

    def sign(self, tenant: str, seq: int, head: bytes) -> Checkpoint:
        """A checkpoint of ``tenant`` at ``seq`` with head hash ``head``, signed now."""
        now = time.time_ns() // 1000
        return Checkpoint(tenant, seq, head, self.key_id, now,
                          self.key.sign(signed_message(tenant, seq, head, self.key_id, now)))

    @classmethod
    def from_settings(cls, settings: TrustSettings) -> CheckpointSigner:
        """The signer configured by ``KEEL_AUDIT_SIGNING_KEY_FILE`` and ``KEEL_AUDIT_SIGNING_KEY_ID``."""
        if settings.audit_signing_key_file is None:
            raise ConfigError("set KEEL_AUDIT_SIGNING_KEY_FILE to an Ed25519 private key (PEM)",
                              code="signing_key_missing")
        key = serialization.load_pem_private_key(settings.audit_signing_key_file.read_bytes(), None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{settings.audit_signing_key_file} is not an Ed25519 private key",
                              code="signing_key_invalid")
        return cls(settings.audit_signing_key_id, key)


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys checkpoints may be signed with, by key id (several during a rotation)."""

    keys: dict[str, Ed25519PublicKey]

    def check(self, checkpoint: Checkpoint) -> None:
        """Raise ``UnknownSigningKey`` or ``BadSignature`` unless ``checkpoint`` is authentic."""
        key = self.keys.get(checkpoint.key_id)
        if key is None:
            raise UnknownSigningKey(f"checkpoint {checkpoint.tenant}#{checkpoint.seq} is signed by unknown key "
                                    f"{checkpoint.key_id!r}; trusted: {sorted(self.keys)}", field="key_id")
        try:
            key.verify(checkpoint.signature, checkpoint.message())
        except InvalidSignature:
            raise BadSignature(f"checkpoint {checkpoint.tenant}#{checkpoint.seq} signature does not verify "
                               f"under key {checkpoint.key_id!r}", field="signature") from None

    @classmethod
    def from_dir(cls, folder: Path) -> TrustedKeys:
        """Every ``<key-id>.pub.pem`` in ``folder``."""
        keys: dict[str, Ed25519PublicKey] = {}
        for path in sorted(folder.glob("*.pub.pem")):
            key = serialization.load_pem_public_key(path.read_bytes())
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"{path} is not an Ed25519 public key", code="trusted_key_invalid")
            keys[path.name.removesuffix(".pub.pem")] = key
        return cls(keys)

    @classmethod
    def from_settings(cls, settings: TrustSettings) -> TrustedKeys:
        """The set in ``KEEL_AUDIT_TRUSTED_KEYS_DIR``."""
        if settings.audit_trusted_keys_dir is None:
            raise ConfigError("set KEEL_AUDIT_TRUSTED_KEYS_DIR to a folder of <key-id>.pub.pem files",
                              code="trusted_keys_missing")
        return cls.from_dir(settings.audit_trusted_keys_dir)


def generate_signing_key(folder: Path, key_id: str) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as ``<key-id>.pem`` and ``<key-id>.pub.pem``; returns both paths."""
    key = Ed25519PrivateKey.generate()
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{key_id}.pem", folder / f"{key_id}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
