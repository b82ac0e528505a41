"""Keel's Avro binary codec: a plan compiled from a fastavro-parsed schema, byte-identical to fastavro."""

from typing import Any

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
