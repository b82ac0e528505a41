"""JSON Schema of messages as Avro carries them: every integer is an Avro ``long``.

Pydantic's ``int`` is unbounded, but a value beyond a signed 64-bit long cannot be encoded
(the gateway refuses it, 422), so a schema that stated no bounds would call it valid.
Every schema a client reads (``GET /v1/actions``, the OpenAPI document) is made with
``LongBounded``, so it says exactly what is accepted.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1


class LongBounded(GenerateJsonSchema):
    """Pydantic's JSON Schema, each integer bounded to an Avro long (tighter bounds of the model stay)."""

    def int_schema(self, schema: core_schema.IntSchema) -> JsonSchemaValue:
        described: dict[str, Any] = super().int_schema(schema)
        low = max(_bound(described, "minimum", "exclusiveMinimum", +1), LONG_MIN)
        high = min(_bound(described, "maximum", "exclusiveMaximum", -1), LONG_MAX)
        described.pop("exclusiveMinimum", None)
        described.pop("exclusiveMaximum", None)
        return {**described, "minimum": low, "maximum": high}


def _bound(described: dict[str, Any], inclusive: str, exclusive: str, step: int) -> int:
    """The model's inclusive bound on one side, or the widest long."""
    if inclusive in described:
        return int(described[inclusive])
    if exclusive in described:
        return int(described[exclusive]) + step
    return LONG_MIN if step > 0 else LONG_MAX
