"""Dead letters: list them, show one, and redrive them to the topic they came from.

A redrive re-produces the original bytes, key and headers (minus the error headers, plus
``keel-redriven-from``) to the source topic. Redriving twice is harmless: the processor
acknowledges a command id it already decided without executing it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaError, Message, Producer

from keel.config import Settings
from keel.errors import KeelError
from keel.kafka.clients import producer_config
from keel.kafka.reader import read_to_end, record_headers
from keel.kafka.topics import Topic, topic_name

ERROR_HEADERS = ("keel-error-code", "keel-error-reason", "keel-source-topic", "keel-source-partition",
                 "keel-source-offset")


@dataclass(frozen=True)
class DeadLetter:
    """One DLQ record: where it is, why it is there, and what it held."""

    partition: int
    offset: int
    code: str
    reason: str
    source: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"


def dead_letters(settings: Settings, code: str | None = None) -> list[DeadLetter]:
    """Every dead letter, optionally only those with ``code``."""
    found = []
    for message in read_to_end(settings, topic_name(settings, Topic.DLQ)):
        headers = tuple((k, v or b"") for k, v in record_headers(message))
        named = dict(headers)
        partition, offset = message.partition(), message.offset()
        assert partition is not None and offset is not None, "a consumed message always has a position"
        letter = DeadLetter(
            partition=partition, offset=offset,
            code=named.get("keel-error-code", b"").decode(), reason=named.get("keel-error-reason", b"").decode(),
            source=named.get("keel-source-topic", b"").decode(), key=message.key(), value=message.value(),
            headers=headers)
        if code is None or letter.code == code:
            found.append(letter)
    return found


def find(settings: Settings, position: str) -> DeadLetter:
    """The dead letter at ``partition:offset``."""
    for letter in dead_letters(settings):
        if letter.position == position:
            return letter
    raise KeelError(f"no dead letter at {position}", code="dead_letter_not_found")


def redrive(settings: Settings, letters: Iterable[DeadLetter]) -> int:
    """Send ``letters`` back to their source topics; returns how many were acknowledged."""
    producer = Producer(producer_config(settings))
    failures: list[str] = []
    sent = 0
    for letter in letters:
        if not letter.source:
            failures.append(f"{letter.position}: no source topic recorded")
            continue
        headers: list[tuple[str, str | bytes | None]] = [(k, v) for k, v in letter.headers if k not in ERROR_HEADERS]
        headers.append(("keel-redriven-from", f"{topic_name(settings, Topic.DLQ)}:{letter.position}".encode()))
        producer.produce(letter.source, letter.value, letter.key, headers=headers,
                         on_delivery=_note_failure(failures, letter.position))
        sent += 1
    producer.flush(30)
    if failures:
        raise KeelError(f"{len(failures)} dead letter(s) were not redriven: {'; '.join(failures[:5])}",
                        code="redrive_failed")
    return sent


def _note_failure(failures: list[str], position: str) -> Callable[[KafkaError | None, Message], None]:
    """A delivery callback that adds a failed redrive of the letter at ``position`` to ``failures``."""
    def on_delivery(err: KafkaError | None, _message: Message) -> None:
        if err:
            failures.append(f"{position}: {err}")
    return on_delivery
