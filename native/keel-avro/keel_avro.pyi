"""Keel's Avro binary codec: a plan compiled from a fastavro-parsed schema, byte-identical to fastavro;
and the builder of decoded envelopes."""

from typing import Any

ID_PATTERN: str
"""The identifier rule ``EnvelopeBuilder`` implements."""

class UnsupportedSchema(ValueError):
    """The schema uses an Avro feature the plan does not compile (fastavro handles it)."""

class CorruptData(ValueError):
    """The bytes are not a record of the plan's schema."""

class Plan:
    """A compiled Avro schema: ``encode`` writes a record after ``prefix``, ``decode`` reads one."""

    def __init__(self, schema: dict[str, Any] | list[Any] | str, prefix: bytes = b"") -> None:
        """Compile ``schema`` (a ``fastavro.parse_schema`` result); raises ``UnsupportedSchema``."""

    def encode(self, record: object) -> bytes | None:
        """``prefix`` and the bytes fastavro's ``schemaless_writer`` writes for ``record``; ``None``
        when a value is not of the exact type the schema expects (fastavro then writes or rejects it)."""

    def decode(self, data: bytes, offset: int = 0) -> Any:
        """The value fastavro's ``schemaless_reader`` reads from ``data[offset:]``; raises ``CorruptData``."""

class EnvelopeBuilder:
    """Builds ``keel.domain.envelope.Envelope``s from decoded records, checking the model rules the
    Avro types do not hold; ``None`` for a record it cannot confirm (pydantic decides then)."""

    def __init__(self, envelope: type, envelope_fields: list[str], actor: type, actor_fields: list[str],
                 link: type, link_fields: list[str], authority: type, authority_fields: list[str],
                 kinds: dict[str, object]) -> None:
        """The models with their field names, in order; raises ``ValueError`` for fields it does not know."""

    def build(self, record: dict[str, Any], payload: object) -> Any:
        """The envelope of ``record`` carrying ``payload`` (its validated payload model), or ``None``."""
