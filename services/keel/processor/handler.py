"""What the processor does with one record from the commands topic, without Kafka I/O.

A record ends in exactly one outcome: events to publish (the command's decision), a
dead letter (bytes that are not a valid command, or a handler crash, with the reason),
or a duplicate (already decided; acknowledged, not re-executed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.domain.messages import payload_class
from keel.domain.outcomes import to_events
from keel.domain.subscription import decide
from keel.errors import KeelError
from keel.processor.state import BatchView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decided:
    """The command was decided; these events are its outcome."""

    command: Envelope
    events: list[Envelope]


@dataclass(frozen=True)
class DeadLetter:
    """The record cannot be processed; it goes to the DLQ with the reason."""

    code: str
    reason: str


@dataclass(frozen=True)
class Duplicate:
    """The command id was decided before; acknowledged without re-executing."""

    command: Envelope


Outcome = Decided | DeadLetter | Duplicate


def handle(value: bytes | None, key: bytes | None, partition: int, view: BatchView,
           codec: EnvelopeCodec) -> Outcome:
    """Decode, check and decide one commands-topic record against the batch's state."""
    if value is None:
        return DeadLetter("empty_record", "the record has no value")
    try:
        command = codec.decode(value)
    except KeelError as exc:
        return DeadLetter(exc.code, exc.message)
    if payload_class(command.type).kind != "command":
        return DeadLetter("not_a_command", f"{command.type} is an event, not a command")
    if key is None or key.decode(errors="replace") != command.key:
        # The key decides the partition, and so which worker owns the aggregate: a record
        # whose key disagrees with its envelope would split the aggregate's state.
        return DeadLetter("key_mismatch", f"record key {key!r} is not the envelope's {command.key!r}")
    if view.already_decided(partition, command.id):
        return Duplicate(command)
    try:
        state = view.state(partition, command.key)
        events = to_events(command, decide(command, state), version=state.version,
                           now=datetime.now(UTC))
    except Exception as exc:  # noqa: BLE001 - a crashing handler must not stop the partition
        log.exception("handler crashed on command %s", command.id)
        return DeadLetter("handler_error", f"{type(exc).__name__}: {exc}")
    view.record(partition, command.id, events)
    return Decided(command, events)
