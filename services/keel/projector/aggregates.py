"""Aggregates fed by a materialized view on ``events``, made whole again after a crash.

ClickHouse writes an INSERT into ``events`` first and then into the views it feeds, not
atomically. A projector killed between the two parts leaves an aggregate one batch short,
and the batch is never read again: the positions the projector resumes from are those of
``events``. So each aggregate stores, in the same block as its counts, the highest offset
it counted per topic partition (``_topic``, ``_partition``, ``_offset``). Before it
projects, the projector compares them with those of ``events`` and counts what an
aggregate lacks straight from ``events``, through the aggregate's parameterized view
``<table>_after`` (its materialized view's SELECT over a slice): one INSERT per lagging
partition, itself one block, so a crash during the repair leaves it to the next start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from keel.errors import InfraError
from keel.projector.store import stored_offsets

log = logging.getLogger(__name__)

AGGREGATES = ("tenant_hourly",)  # fed by <table>_mv from events; repaired through <table>_after


@dataclass(frozen=True)
class Repair:
    """Events of one partition an aggregate had not counted, counted now."""

    table: str
    partition: int
    after: int  # the aggregate's last counted offset, -1 for none
    through: int  # the last offset in events


def repair_aggregates(client: Client, topic: str, projected: dict[int, int]) -> list[Repair]:
    """Count into every aggregate the events of ``topic`` it lacks; returns what was repaired.

    ``projected`` is the highest offset per partition in ``events`` (``stored_offsets``).
    """
    repairs: list[Repair] = []
    for table in AGGREGATES:
        counted = stored_offsets(client, topic, table)
        for partition, through in sorted(projected.items()):
            after = counted.get(partition, -1)
            if after > through:  # e.g. events rolled back without recomputing the aggregate
                log.warning("%s counted %s[%d] up to offset %d, past the %d in events; "
                            "`keel projections rebuild %s` recomputes it from events",
                            table, topic, partition, after, through, table,
                            extra={"table": table, "topic": topic, "partition": partition})
            if after >= through:
                continue
            repair = Repair(table, partition, after, through)
            _count_missing(client, topic, repair)
            log.warning("%s lacked events %d..%d of %s[%d] (a crash between the events insert "
                        "and its materialized view); counted them from events", table, after + 1,
                        through, topic, partition,
                        extra={"table": table, "topic": topic, "partition": partition})
            repairs.append(repair)
    return repairs


def _count_missing(client: Client, topic: str, repair: Repair) -> None:
    try:
        client.command(
            f"INSERT INTO {repair.table} SELECT * FROM {repair.table}_after("
            "topic = {topic:String}, partition = {partition:UInt32}, after = {after:Int64})",
            parameters={"topic": topic, "partition": repair.partition, "after": repair.after})
    except ClickHouseError as exc:
        raise InfraError(f"counting events {repair.after + 1}..{repair.through} of {topic}"
                         f"[{repair.partition}] into {repair.table} failed: {exc}",
                         code="projection_insert_failed") from exc
