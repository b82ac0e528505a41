"""Keel's Avro binary codec: a plan compiled from a fastavro-parsed schema, byte-identical to fastavro;
the builder of decoded envelopes; a UUID's text; an audit record's fields."""

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

    def __init__(self, envelope: type, envelope_defaults: dict[str, Any], actor: type, actor_defaults: dict[str, Any],
                 link: type, link_defaults: dict[str, Any], authority: type, authority_defaults: dict[str, Any],
                 kinds: dict[str, object], required: object) -> None:
        """The models with each field's default (``required``, pydantic's ``PydanticUndefined``, for none),
        in order; raises ``ValueError`` for fields it does not know."""

    def build(self, record: dict[str, Any], payload: object) -> Any:
        """The envelope of ``record`` carrying ``payload`` (its validated payload model), or ``None``."""

def audit_head(prefix: bytes, fields: tuple[object, ...]) -> bytes | None:
    """An audit record's bytes before its hash (``keel.trust.record``'s ``KAR1`` layout): ``prefix`` (magic, seq,
    previous hash), then each field (``None``, ``str``, ``bytes`` or ``int``); ``None`` for a value of another
    type, a string that is not UTF-8 or a value too long, which the Python implementation writes or refuses."""

def uuid_text(value: object) -> str:
    """``str(value)``, formatted natively for a ``uuid.UUID`` (``UUID.__str__`` is Python code)."""
