"""Where replayed records go: a JSON-lines or Avro container file, another topic, or a ClickHouse table.

Every sink can say how far it durably got (``flush`` returns its state) and pick up from
that state after an interruption (``resume``): files are cut back to the size they had at
the last checkpoint, so a record is never written twice; a table sink inserts batches with
deterministic deduplication tokens; a topic sink is at-least-once across a crash (event ids
are deterministic, so consumers dedupe), exactly-once otherwise.

Only a JSON-lines file can be for people: given a reader (``keel.trust.reveal``), its sealed
values read as that reader sees them. Every other sink copies records as stored (ciphertext).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError
from confluent_kafka import Message, Producer
from fastavro import parse_schema, writer

from keel.config import Settings
from keel.domain.envelope import Envelope
from keel.errors import InfraError
from keel.kafka.clients import producer_config
from keel.projector.rows import EVENTS_TABLE, Position, event_row
from keel.projector.store import Batch, insert_batch
from keel.replay.errors import ReplayError
from keel.trust.reveal import Disclosure, Reader

RECORD_SCHEMA = parse_schema({
    "type": "record", "name": "ReplayedRecord", "namespace": "keel.replay",
    "doc": "One Kafka record as replayed: where it was, and its bytes (Avro single-object envelope).",
    "fields": [
        {"name": "topic", "type": "string"},
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
        {"name": "timestamp_ms", "type": "long"},
        {"name": "key", "type": ["null", "bytes"]},
        {"name": "value", "type": "bytes"},
    ],
})


class Sink(Protocol):
    """A replay target."""

    def write(self, message: Message, event: Envelope) -> None:
        """Take one record that passed the filters (re-encoded if it held values under erased keys)."""

    def flush(self) -> dict[str, Any]:
        """Make everything written so far durable; returns the state to resume from."""

    def resume(self, state: dict[str, Any]) -> None:
        """Continue after an interruption from a state ``flush`` returned."""

    def close(self) -> None:
        """Release files and clients."""


class JsonLinesSink:
    """One JSON object per line: the record's position and the decoded envelope.

    With a ``reader``, sealed values are written as it sees them, and what it showed in
    plaintext is handed to ``record`` (which audits the read) before each flush makes it
    durable. If recording fails, the file is cut back to where the last recorded flush left
    it: no plaintext whose read went unrecorded stays in it.
    """

    def __init__(self, path: Path, reader: Reader | None = None,
                 record: Callable[[Sequence[Disclosure]], None] = lambda _reads: None) -> None:
        self.path = path
        self._file = path.open("ab")
        self._reader, self._record = reader, record
        self._recorded = self._file.tell()

    def write(self, message: Message, event: Envelope) -> None:
        shown = event if self._reader is None else self._reader.envelope(event)
        line = {"topic": message.topic(), "partition": message.partition(), "offset": message.offset(),
                "timestamp_ms": message.timestamp()[1], "event": shown.model_dump(mode="json")}
        self._file.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")

    def flush(self) -> dict[str, Any]:
        self._settle()
        self._file.flush()
        return {"bytes": self._file.tell()}

    def resume(self, state: dict[str, Any]) -> None:
        self._file.truncate(int(state.get("bytes", 0)))
        self._file.seek(0, 2)
        self._recorded = self._file.tell()

    def close(self) -> None:
        try:
            self._settle()
        finally:
            self._file.close()

    def _settle(self) -> None:
        """Record what was revealed since the last flush, or cut it out of the file."""
        if self._reader is not None and (reads := self._reader.take()):
            try:
                self._record(reads)
            except BaseException:
                self._file.truncate(self._recorded)
                raise
        self._recorded = self._file.tell()


class AvroFileSink:
    """An Avro object container file of ``RECORD_SCHEMA`` records; appends resume a cut file."""

    def __init__(self, path: Path, block_records: int = 5000) -> None:
        self.path = path
        self._pending: list[dict[str, Any]] = []
        self._block = block_records

    def write(self, message: Message, event: Envelope) -> None:
        key = message.key()
        self._pending.append({"topic": message.topic() or "", "partition": message.partition() or 0,
                              "offset": message.offset() or 0, "timestamp_ms": message.timestamp()[1],
                              "key": bytes(key) if key is not None else None, "value": bytes(message.value() or b"")})
        if len(self._pending) >= self._block:
            self.flush()

    def flush(self) -> dict[str, Any]:
        if self._pending:
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            with self.path.open("wb" if fresh else "a+b") as out:
                writer(out, RECORD_SCHEMA, self._pending, codec="deflate")  # appending reuses the file's schema
            self._pending = []
        return {"bytes": self.path.stat().st_size if self.path.exists() else 0}

    def resume(self, state: dict[str, Any]) -> None:
        size = int(state.get("bytes", 0))
        if self.path.exists():
            with self.path.open("r+b") as cut:
                cut.truncate(size)  # every checkpoint ends on a block boundary

    def close(self) -> None:
        self.flush()


class TopicSink:
    """Produces the record's bytes and key to ``topic`` with an idempotent producer."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self._producer = Producer(producer_config(settings))

    def write(self, message: Message, event: Envelope) -> None:
        while True:
            try:
                self._producer.produce(self.topic, message.value(), key=message.key())
                break
            except BufferError:
                self._producer.poll(0.1)
        self._producer.poll(0)

    def flush(self) -> dict[str, Any]:
        left = self._producer.flush(60)
        if left:
            raise InfraError(f"{left} replayed records were not acknowledged by {self.topic}",
                             code="delivery_failed")
        return {}

    def resume(self, state: dict[str, Any]) -> None:
        """Nothing to cut: records after the last checkpoint may be produced again."""

    def close(self) -> None:
        self.flush()


class TableSink:
    """Inserts into a ClickHouse table shaped like ``events`` (created if missing), idempotently."""

    def __init__(self, client: Client, table: str, source_topic: str, batch_rows: int = 50_000) -> None:
        self.table = table
        self._client = client
        self._batch = Batch(source_topic)
        self._rows = batch_rows
        try:
            client.command(f"CREATE TABLE IF NOT EXISTS {quote_identifier(table)} AS {EVENTS_TABLE}")
        except ClickHouseError as exc:
            raise ReplayError(f"cannot create the replay table {table}: {exc}", code="bad_target") from exc

    def write(self, message: Message, event: Envelope) -> None:
        position = Position(message.topic() or "", message.partition() or 0, message.offset() or 0)
        self._batch.add(event_row(event, position), position)
        if len(self._batch.rows) >= self._rows:
            self.flush()

    def flush(self) -> dict[str, Any]:
        insert_batch(self._client, self._batch, self.table)
        self._batch = Batch(self._batch.topic)
        return {}

    def resume(self, state: dict[str, Any]) -> None:
        """Nothing to cut: a repeated batch has the same token and is dropped."""

    def close(self) -> None:
        self.flush()
