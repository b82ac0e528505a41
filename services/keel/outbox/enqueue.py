"""The SDK's outbox call: write a command inside the producer's own database transaction.

A producer that keeps its state in SQLite or PostgreSQL calls ``enqueue`` in the same
transaction as its business write; both commit or neither does, and ``keel relay``
later moves the command to Kafka. Nothing here commits: the caller's transaction does.
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Any

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.domain.messages import payload_class
from keel.errors import KeelError, ValidationError
from keel.outbox.db import Cursor
from keel.outbox.models import Accepted, NewCommand
from keel.outbox.store import insert_commands


def to_new_command(command: Envelope, value: bytes, request_hash: str | None = None) -> NewCommand:
    """The outbox row of an encoded command; the hash defaults to the encoding's."""
    return NewCommand(
        command_id=command.id, tenant_id=command.tenant_id, key=command.key, command_type=command.type,
        actor=f"{command.actor.kind.value}:{command.actor.id}",
        request_hash=request_hash or hashlib.sha256(value).hexdigest(), value=value,
    )


def enqueue(connection: Any, command: Envelope, codec: EnvelopeCodec | None = None) -> Accepted:
    """Add ``command`` to the outbox in ``connection``'s open transaction (sqlite3 or psycopg 3).

    Raises ``KeelError`` (code ``idempotency_conflict``) when the id was used for another command.
    """
    if payload_class(command.type).kind != "command":
        raise ValidationError(f"{command.type} is an event; only commands can be sent", field="type")
    value = (codec or EnvelopeCodec()).encode(command)
    postgres = not isinstance(connection, sqlite3.Connection)
    [result] = insert_commands(Cursor(connection.cursor(), postgres=postgres), [to_new_command(command, value)])
    if result.conflict:
        raise KeelError(f"command id {command.id} was already used for another command",
                        code="idempotency_conflict", field="id")
    return result
