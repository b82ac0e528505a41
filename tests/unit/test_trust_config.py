"""Trust configuration: signing and master keys load from files, and bad ones are typed errors."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from keel.errors import ConfigError
from keel.trust.checkpoints import CheckpointSigner, TrustedKeys, generate_signing_key
from keel.trust.keystore import MasterKey
from keel.trust.settings import TrustSettings


def test_signing_key_and_trusted_set_load_from_the_environment(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    private, _public = generate_signing_key(tmp_path, "k7")
    monkeypatch.setenv("KEEL_AUDIT_SIGNING_KEY_FILE", str(private))
    monkeypatch.setenv("KEEL_AUDIT_SIGNING_KEY_ID", "k7")
    monkeypatch.setenv("KEEL_AUDIT_TRUSTED_KEYS_DIR", str(tmp_path))
    settings = TrustSettings()
    checkpoint = CheckpointSigner.from_settings(settings).sign("acme", 3, bytes(32))
    TrustedKeys.from_settings(settings).check(checkpoint)
    assert checkpoint.key_id == "k7" and oct(private.stat().st_mode)[-3:] == "600"


def test_missing_or_wrong_keys_are_config_errors_with_codes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        CheckpointSigner.from_settings(TrustSettings(audit_signing_key_file=None))
    assert caught.value.code == "signing_key_missing"
    short = tmp_path / "short.key"
    short.write_bytes(b"not 32 bytes")
    with pytest.raises(ConfigError) as caught:
        MasterKey.from_settings(TrustSettings(master_key_file=short))
    assert caught.value.code == "master_key_invalid"


def test_master_key_reads_raw_or_base64_and_derives_distinct_tenant_keys(tmp_path: Path) -> None:
    root = os.urandom(32)
    raw, text = tmp_path / "raw.key", tmp_path / "b64.key"
    raw.write_bytes(root)
    text.write_text(base64.b64encode(root).decode() + "\n")
    a = MasterKey.from_settings(TrustSettings(master_key_file=raw))
    b = MasterKey.from_settings(TrustSettings(master_key_file=text))
    nonce = bytes(12)
    sealed = a.for_tenant("acme").encrypt(nonce, b"k", None)
    assert b.for_tenant("acme").decrypt(nonce, sealed, None) == b"k"
    assert a.for_tenant("globex").encrypt(nonce, b"k", None) != sealed
