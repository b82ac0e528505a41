"""Personal fields: plaintext with a format rule, or sealed ciphertext, or the erased marker.

Fields marked ``"keel.personal": true`` in the schemas are sealed at the edge (SDK,
gateway) and re-sealed by the processor, so most consumers only ever see ciphertext. The
format rule (an e-mail address, a length) therefore applies to plaintext alone; a sealed
value, the marker left by erasure and the one a reader sees in place of ciphertext pass as they are.

Each personal type carries the ``PERSONAL`` marker in its ``Annotated`` metadata:
``keel schemas freeze`` finds it on a model field (``is_personal``) and writes the field
with ``"keel.personal": true``, so the model is the one place a team says what is personal.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Final

from pydantic import AfterValidator, WithJsonSchema
from pydantic.fields import FieldInfo

SEALED_PREFIX = "keel-enc:v1:"
ERASED = "⟨erased⟩"
SEALED = "⟨sealed⟩"
"""What a reader not allowed to see a sealed value reads instead of its ciphertext (``keel.trust.reveal``)."""


class Personal:
    """The marker of a personal type in ``Annotated`` metadata (one instance: ``PERSONAL``)."""

    def __repr__(self) -> str:
        return "PERSONAL"


PERSONAL: Final = Personal()


def is_personal(field: FieldInfo) -> bool:
    """Whether a model field holds personal data: typed ``personal(...)``, alone or optional.

    Pydantic moves a field's own ``Annotated`` metadata to ``field.metadata`` but leaves it
    inside the annotation when the type is a union such as ``PersonalText | None``.
    """
    if any(isinstance(item, Personal) for item in field.metadata):
        return True
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(typing.get_origin(arg) is Annotated and any(isinstance(m, Personal) for m in arg.__metadata__)
                   for arg in typing.get_args(annotation))
    return False


def is_sealed(value: object) -> bool:
    """Whether ``value`` is a sealed personal value."""
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def personal(*, pattern: str | None = None, max_length: int) -> Any:
    """A string type whose format rule holds for plaintext only.

    Its JSON schema (``GET /v1/actions``, the OpenAPI document) states the rule, as what a
    client sends is plaintext: the edge seals it.
    """
    compiled = re.compile(pattern) if pattern else None

    def check(value: str) -> str:
        if is_sealed(value) or value in (ERASED, SEALED):
            return value
        if len(value) > max_length:
            raise ValueError(f"at most {max_length} characters")
        if compiled is not None and not compiled.fullmatch(value):
            raise ValueError(f"does not match {pattern}")
        return value

    described: dict[str, Any] = {"type": "string", "maxLength": max_length}
    if pattern:
        described["pattern"] = f"^(?:{pattern})$"
    return Annotated[str, AfterValidator(check), WithJsonSchema(described), PERSONAL]


EmailAddress = personal(pattern=r"[^@\s]+@[^@\s]+", max_length=320)
PersonalText = personal(max_length=100_000)
