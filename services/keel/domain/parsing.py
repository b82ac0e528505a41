"""Validating untrusted mappings as envelopes, with errors that name the field path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic

from keel.domain.envelope import Envelope
from keel.domain.messages import payload_class
from keel.errors import ValidationError


def parse_envelope(data: Mapping[str, Any]) -> Envelope:
    """Validate a mapping as an envelope; errors name the offending field path."""
    if not isinstance(data, Mapping):
        raise ValidationError("a message must be an object", field="")
    raw = dict(data)
    if isinstance(raw.get("payload"), Mapping):
        cls = payload_class(str(raw.get("type")))
        try:
            raw["payload"] = cls.model_validate(raw["payload"])
        except pydantic.ValidationError as exc:
            raise _typed(exc, prefix="payload") from None
    try:
        return Envelope.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise _typed(exc) from None


def _typed(exc: pydantic.ValidationError, prefix: str = "") -> ValidationError:
    first = exc.errors()[0]
    path = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return ValidationError(f"{path or 'message'}: {first['msg']}{more}", field=path)
