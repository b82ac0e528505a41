"""Validating untrusted mappings as envelopes, with errors that name the field path."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import pydantic
import pydantic_core

from keel.domain.envelope import Envelope
from keel.domain.messages import payload_class
from keel.errors import ValidationError


Builder = Callable[[dict[str, Any], Any], Any]
"""Builds the envelope of a mapping whose payload ``parse_envelope`` validated, or returns None
when it cannot confirm every rule (``keel_avro.EnvelopeBuilder.build``, see ``keel.contracts.codec``)."""


def parse_envelope(data: Mapping[str, Any], *, strict: bool = False, integral_floats: bool = True,
                   builder: Builder | None = None) -> Envelope:
    """Validate a mapping as an envelope; errors name the offending field path.

    ``strict``, for a body a client sent as JSON: its payload is validated as JSON in pydantic's
    strict mode, so ``true`` or ``"5"`` is no integer and ``1`` no string, exactly as the JSON
    schema of ``GET /v1/actions`` and the OpenAPI document say; as in JSON Schema, ``5.0`` is
    the integer 5. (A payload model with a ``before`` validator is validated from Python values
    there, strictly: keep payload models declarative.) Decoded records are trusted and
    validated as they are. ``integral_floats=False`` says ``data`` holds no float of an integer
    value (a caller that looked already), so the walk that makes them integers is skipped.
    ``builder``, once the payload is validated here, builds the envelope faster than pydantic
    or defers to it.
    """
    if type(data) is not dict and not isinstance(data, Mapping):
        raise ValidationError("a message must be an object", field="")
    raw = {name: _whole(value) for name, value in data.items()} if strict and integral_floats else dict(data)
    payload = raw.get("payload")
    if type(payload) is dict or isinstance(payload, Mapping):
        cls = payload_class(str(raw.get("type")))
        text = _json(payload) if strict else None
        try:
            validator = cls.__pydantic_validator__  # not ``model_validate``: its frame cost half a µs a call
            raw["payload"] = (validator.validate_json(text, strict=True) if text is not None
                              else validator.validate_python(payload))
        except pydantic.ValidationError as exc:
            raise _typed(exc, prefix="payload") from None
        if builder is not None and (built := builder(raw, raw["payload"])) is not None:
            return cast(Envelope, built)
    try:
        envelope: Envelope = Envelope.__pydantic_validator__.validate_python(raw)
    except pydantic.ValidationError as exc:
        raise _typed(exc) from None
    return envelope


def _json(payload: Any) -> bytes | None:
    """``payload`` as JSON text; None when it has no JSON form (a lone surrogate), so the Python
    validation that runs instead names the field."""
    try:
        return pydantic_core.to_json(payload)
    except pydantic_core.PydanticSerializationError:
        return None


def _whole(value: Any) -> Any:
    """``value`` with every integral float an int, as JSON Schema counts ``5.0`` an integer."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole(item) for item in value]
    return value


def _typed(exc: pydantic.ValidationError, prefix: str = "") -> ValidationError:
    first = exc.errors()[0]
    path = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return ValidationError(f"{path or 'message'}: {first['msg']}{more}", field=path)
