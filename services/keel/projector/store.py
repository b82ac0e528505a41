"""A log table (``events``, ``commands``) as the projector's store: resume points, idempotent inserts.

The Kafka position of every event is stored in its row, so the projection itself says
where to resume (the highest offset per partition plus one) and Kafka's committed offsets
are only a lag gauge. Each batch carries a deterministic ``insert_deduplication_token``
built from its offset spans: a batch retried after a lost acknowledgement is dropped by
ClickHouse instead of written twice, even if its rows were re-mapped meanwhile (without a
token only byte-identical blocks are dropped), and ReplacingMergeTree collapses any event
that still arrives twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

from keel.errors import InfraError
from keel.projector.native import NativeBatch
from keel.projector.rows import EVENT_COLUMNS, EVENTS_TABLE, Position
from keel.trust.erased import Erased

_PAYLOAD = EVENT_COLUMNS.index("payload")
_INSERT_ATTEMPTS = 3
_RETRY_PAUSE_S = 0.5


@dataclass(frozen=True)
class Span:
    """The first and last offset of one partition's records in a batch."""

    partition: int
    first: int
    last: int


@dataclass
class Batch:
    """Rows read from one topic, in offset order per partition, with the spans they cover.

    A batch for the native path (``keel.projector.native``) holds undecoded bodies in
    ``native`` instead of rows; spans and token work the same.
    """

    topic: str
    rows: list[list[Any]] = field(default_factory=list)
    native: NativeBatch | None = None
    newest_ms: int = 0
    opened_at: float = 0.0
    """When its first record was read (Unix time; 0: not measured)."""
    traces: list[tuple[bytes, int, int]] = field(default_factory=list)
    """``(traceparent, partition, offset)`` of its sampled records, when tracing is on."""
    """Kafka timestamp of the newest record read into it (the projection lag is measured from it)."""
    # partition -> [first offset, last offset]; mutable lists keep the per-record cost low
    _spans: dict[int, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows) + (self.native.count if self.native is not None else 0)

    def add(self, row: list[Any], position: Position) -> None:
        """Append ``row`` read at ``position`` (which must be on this batch's topic)."""
        self.mark(position.partition, position.offset)
        self.rows.append(row)

    def mark(self, partition: int, offset: int) -> None:
        """Extend the spans to ``offset`` of ``partition`` (its record went into ``native``)."""
        span = self._spans.get(partition)
        if span is None:
            self._spans[partition] = [offset, offset]
        else:
            span[1] = offset

    def payloads(self) -> Iterator[str]:
        """The payload JSON of every row."""
        return (row[_PAYLOAD] for row in self.rows)

    def redact(self, erased: Erased) -> None:
        """Write the values sealed under ``erased`` keys as ``⟨erased⟩`` in every row's payload."""
        if erased.key_ids:
            for row in self.rows:
                row[_PAYLOAD] = erased.text(row[_PAYLOAD])

    def same_records_as(self, other: Batch) -> None:
        """Take ``other``'s spans: these rows are the records it read, so the token is the same."""
        self._spans = {partition: list(span) for partition, span in other._spans.items()}

    @property
    def ordered_spans(self) -> list[Span]:
        """The spans in partition order."""
        return [Span(partition, *self._spans[partition]) for partition in sorted(self._spans)]

    @property
    def token(self) -> str:
        """The deduplication token: the same records always give the same token."""
        spans = ",".join(f"{s.partition}:{s.first}-{s.last}" for s in self.ordered_spans)
        return f"{self.topic}/{spans}"


def stored_offsets(client: Client, topic: str, table: str = EVENTS_TABLE) -> dict[int, int]:
    """The highest offset of ``topic`` that ``table`` holds, per partition."""
    try:
        result = client.query(
            f"SELECT _partition, max(_offset) FROM {table} "
            "WHERE _topic = {topic:String} GROUP BY _partition",
            parameters={"topic": topic},
        )
    except ClickHouseError as exc:
        raise InfraError(f"cannot read stored positions of {topic} in {table}: {exc}",
                         code="projection_unavailable") from exc
    return {int(partition): int(offset) for partition, offset in result.result_rows}


def insert_batch(client: Client, batch: Batch, table: str = EVENTS_TABLE) -> None:
    """Insert ``batch`` once, retrying transport failures with the same deduplication token.

    The token also reaches the materialized views fed by ``table``, so a retried batch is
    dropped there too.
    """
    if not batch.rows:
        return
    settings = {"insert_deduplication_token": batch.token,
                "deduplicate_blocks_in_dependent_materialized_views": 1}
    for attempt in range(1, _INSERT_ATTEMPTS + 1):
        try:
            client.insert(table, batch.rows, column_names=list(EVENT_COLUMNS), settings=settings)
            return
        except OperationalError as exc:
            if attempt == _INSERT_ATTEMPTS:
                raise _insert_failed(batch, exc) from exc
            time.sleep(_RETRY_PAUSE_S * attempt)
        except ClickHouseError as exc:
            raise _insert_failed(batch, exc) from exc


def _insert_failed(batch: Batch, exc: Exception) -> InfraError:
    return InfraError(f"inserting {len(batch.rows)} events ({batch.token}) failed: {exc}",
                      code="projection_insert_failed")

