"""Personal fields opened for one handler call, and for nothing else.

An effect worker decodes events with the plain codec, so what it holds while effects queue,
wait and back off is ciphertext. Right before an attempt it opens the event's personal
fields (``FieldCipher.open``, against the configured key store), hands the opened copy to
the handler, and drops it with the attempt. A value whose key was erased reaches the
handler as ``⟨erased⟩``. Without a master key there is no key store: events go as decoded.
"""

from __future__ import annotations

from collections.abc import Callable

from keel.bootstrap import trust_settings
from keel.config import Settings
from keel.domain.envelope import Envelope

Opener = Callable[[Envelope], Envelope]


def personal_opener(settings: Settings) -> tuple[Opener, Callable[[], None]]:
    """What opens an event's personal fields, and how to release the key store it holds."""
    trust = trust_settings(settings)
    if trust.master_key_file is None:
        return lambda event: event, lambda: None
    from keel.trust.fields import FieldCipher
    from keel.trust.keystore import open_keystore

    keys = open_keystore(settings, trust)
    return FieldCipher(keys).open, keys.close
