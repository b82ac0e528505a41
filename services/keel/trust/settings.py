"""Settings of the trust slice (``KEEL_*`` variables), kept apart from ``keel.config`` on purpose.

Secrets are referenced by file path so they never appear in ``keel config`` output.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_KEY_CACHE_S = 5.0  # short: the longest another process's erasure can take to reach this one
DATA_KEY_CACHE_KEYS = 10_000
CHAIN_LINGER_S = 0.25


class TrustSettings(BaseSettings):
    """Where the signing key, trusted public keys, master key and key store live; checkpoint cadence."""

    model_config = SettingsConfigDict(env_prefix="KEEL_", frozen=True)

    audit_signing_key_file: Path | None = Field(
        default=None, description="PEM Ed25519 private key that signs checkpoints (the chainer needs it).")
    audit_signing_key_id: str = Field(default="k1", description="Id of the signing key, stored in each checkpoint.")
    audit_trusted_keys_dir: Path | None = Field(
        default=None, description="Folder of <key-id>.pub.pem Ed25519 public keys that verify checkpoints.")
    audit_checkpoint_every: int = Field(default=1000, ge=1, description="Sign a tenant's head every N records.")
    audit_checkpoint_interval_s: float = Field(
        default=10.0, gt=0, description="...or when its newest record is this old and unsigned.")
    audit_chain_linger_s: float = Field(
        default=CHAIN_LINGER_S, gt=0, le=10, description="How long the chainer gathers intake before each transaction: "
        "a transaction costs the broker milliseconds of CPU whatever it holds, so the chain trails the events "
        "by up to this much more in exchange for fewer of them.")
    master_key_file: Path | None = Field(
        default=None, description="File holding the 32-byte root master key (raw or base64) that wraps data keys.")
    master_key_previous_file: Path | None = Field(
        default=None, description="The root master key being rotated away from: keys it wrapped still unwrap "
        "until `keel subjects rotate-master` re-wraps them under KEEL_MASTER_KEY_FILE.")
    keystore_dsn: str | None = Field(
        default=None, description="sqlite:///path (default under data_dir) or postgresql://... for data keys.")
    data_key_cache_s: float = Field(
        default=DATA_KEY_CACHE_S, ge=0, description="How long a process keeps a data key it read, to seal and open without a "
        "key-store query; an erasure by another process takes effect here at most this much later. 0: no cache.")
    data_key_cache_keys: int = Field(default=DATA_KEY_CACHE_KEYS, ge=1, description="Data keys a process keeps at most.")
