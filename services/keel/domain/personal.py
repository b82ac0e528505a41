"""Personal fields: plaintext with a format rule, or sealed ciphertext, or the erased marker.

Fields marked ``"keel.personal": true`` in the schemas are sealed at the edge (SDK,
gateway) and re-sealed by the processor, so most consumers only ever see ciphertext. The
format rule (an e-mail address, a length) therefore applies to plaintext alone; a sealed
value or the marker left by erasure passes as it is.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator

SEALED_PREFIX = "keel-enc:v1:"
ERASED = "⟨erased⟩"


def is_sealed(value: object) -> bool:
    """Whether ``value`` is a sealed personal value."""
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def personal(*, pattern: str | None = None, max_length: int) -> Any:
    """A string type whose format rule holds for plaintext only."""
    compiled = re.compile(pattern) if pattern else None

    def check(value: str) -> str:
        if is_sealed(value) or value == ERASED:
            return value
        if len(value) > max_length:
            raise ValueError(f"at most {max_length} characters")
        if compiled is not None and not compiled.fullmatch(value):
            raise ValueError(f"does not match {pattern}")
        return value

    return Annotated[str, AfterValidator(check)]


EmailAddress = personal(pattern=r"[^@\s]+@[^@\s]+", max_length=320)
PersonalText = personal(max_length=100_000)
