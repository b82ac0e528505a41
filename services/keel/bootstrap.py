"""The one place that builds adapters from the environment.

Personal-data encryption is on whenever a master key is available: the file named by
``KEEL_MASTER_KEY_FILE``, or ``<data_dir>/master.key``, which ``keel up`` creates for
local use (production mounts its own). Then the SDK and the processor seal and open
personal fields through a ``SealingCodec``; everything else keeps ciphertext, except that
what projects or replays records writes values under erased keys as ``⟨erased⟩``, asking
the same key store. The audit signing key defaults the same way, to
``<data_dir>/audit-keys/k1.pem``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.trust.erased import Erasures
from keel.trust.settings import TrustSettings

LOCAL_SIGNING_KEY_ID = "k1"


def local_master_key(settings: Settings) -> Path:
    return settings.data_dir / "master.key"


def local_audit_keys(settings: Settings) -> Path:
    return settings.data_dir / "audit-keys"


def ensure_local_keys(settings: Settings) -> None:
    """Create a development master key and audit signing key under ``data_dir`` if absent."""
    from keel.trust.checkpoints import generate_signing_key

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    master = local_master_key(settings)
    if not master.exists():
        fd = os.open(master, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(32))
    if not (local_audit_keys(settings) / f"{LOCAL_SIGNING_KEY_ID}.pem").exists():
        generate_signing_key(local_audit_keys(settings), LOCAL_SIGNING_KEY_ID)


def trust_settings(settings: Settings) -> TrustSettings:
    """Trust settings from ``KEEL_*``, falling back to the local keys under ``data_dir``."""
    trust = TrustSettings()
    defaults: dict[str, object] = {}
    if trust.master_key_file is None and local_master_key(settings).exists():
        defaults["master_key_file"] = local_master_key(settings)
    signing = local_audit_keys(settings) / f"{LOCAL_SIGNING_KEY_ID}.pem"
    if trust.audit_signing_key_file is None and signing.exists():
        defaults["audit_signing_key_file"] = signing
        defaults["audit_signing_key_id"] = LOCAL_SIGNING_KEY_ID
    if trust.audit_trusted_keys_dir is None and local_audit_keys(settings).exists():
        defaults["audit_trusted_keys_dir"] = local_audit_keys(settings)
    return trust.model_copy(update=defaults)


def edge_codec(settings: Settings) -> tuple[EnvelopeCodec, Callable[[], None]]:
    """The codec for producers and the processor, and how to release what it holds."""
    trust = trust_settings(settings)
    if trust.master_key_file is None:
        return EnvelopeCodec(), lambda: None
    from keel.trust.codec import SealingCodec
    from keel.trust.fields import FieldCipher
    from keel.trust.keystore import open_keystore

    keys = open_keystore(settings, trust)
    return SealingCodec(FieldCipher(keys)), keys.close


def known_erasures(settings: Settings) -> tuple[Erasures, Callable[[], None]]:
    """The erasures projectors and replays apply (the key store's tombstones), and how to release them.

    Without a master key there is no key store to ask, as for ``edge_codec``: values are written as they are.
    """
    trust = trust_settings(settings)
    if trust.master_key_file is None:
        return Erasures(None), lambda: None
    from keel.trust.keystore import open_keystore

    keys = open_keystore(settings, trust)
    return Erasures(keys), keys.close
