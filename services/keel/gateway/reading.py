"""Reading records as one caller may: personal values sealed, erased or (role ``personal_data``) in plaintext.

Every route that shows payloads (a command's record, the approvals list, a timeline) reads
through here, so each follows ``keel.trust.reveal``'s one rule: a plaintext read is recorded
in the tenant's audit chain before it is shown, and a read that cannot be recorded shows
no plaintext.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from keel.domain.principal import Principal
from keel.gateway.submit import Gateway, actor_name
from keel.trust.codec import SealingCodec
from keel.trust.reveal import PERSONAL_DATA_ROLE, Reader

T = TypeVar("T")


def read_as(gw: Gateway, caller: Principal, show: Callable[[Reader], T], *, via: str) -> T:
    """``show(reader)`` with the reader ``caller`` is allowed; blocking (the key store and Kafka).

    When it showed plaintext and the read cannot be recorded, ``show`` runs again with a reader
    that reveals nothing.
    """
    cipher = gw.codec.cipher if isinstance(gw.codec, SealingCodec) else None
    reader = Reader(cipher, reveal=cipher is not None and PERSONAL_DATA_ROLE in caller.roles)
    shown = show(reader)
    reads = reader.take()
    if reads and not gw.security.personal_data_read(actor_name(caller), reads, via=via):
        return show(Reader(cipher))
    return shown
