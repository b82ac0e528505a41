"""Blue-green rebuild of a projection table: fill a shadow, swap it in atomically, keep the old one.

``rebuild`` fills ``<table>__shadow`` while ``<table>`` keeps serving, then runs
``EXCHANGE TABLES`` (one atomic rename on chDB and on a server's Atomic database) and keeps the
old table as ``<table>__previous`` for ``rollback``, which exchanges the two back. Everything
that reads the table by name (tenant-scoped views, the materialized view feeding
``tenant_hourly``) follows the swap.

The log tables (``events``, ``commands``) are replayed from Kafka with the projector itself:
the shadow stores the positions of its rows, so an interrupted rebuild resumes where it
stopped, and every erasure recorded so far applies (values under erased keys read
``⟨erased⟩``). After the swap one more catch-up brings the new table to the topic's end. Run the
rebuild where the projector runs (one chDB path, one process) or stop the projector first:
rows a concurrent projector writes into the old table between the last catch-up and the
swap are re-read by that final catch-up, and ReplacingMergeTree collapses any repeat.
Aggregated tables are recomputed from ``events`` with their materialized view's own SELECT,
and again whenever ``events`` is rebuilt or rolled back (they counted the old table's inserts).
"""

from __future__ import annotations

from collections.abc import Callable
import time
from dataclasses import dataclass

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from keel.config import Settings
from keel.domains.registry import current
from keel.errors import InfraError
from keel.kafka.topics import Topic
from keel.projector.projector import EventProjector, ProjectorStats
from keel.replay.errors import ProjectionError

SHADOW = "__shadow"
PREVIOUS = "__previous"
FROM_KAFKA: dict[str, Topic] = {"events": Topic.EVENTS, "commands": Topic.COMMANDS}
FROM_EVENTS: dict[str, str] = {"tenant_hourly": "tenant_hourly_mv"}  # table -> the view that feeds it
IN_FLIGHT_S = 120.0
"""The longest a rebuild or rollback waits for inserts that began before its swap to land."""
LATE_INSERT_S = 5.0
"""Well past a projector batch's insert: when the second copy runs, no insert begun before the swap is left."""
COMPUTED = frozenset({"command_lifecycle", "approvals", "agent_activity", "tenant_metrics"})
"""Keel's views computed at query time; every domain view (``Domain.views``) is one too."""


@dataclass(frozen=True)
class RebuildReport:
    """What a rebuild did: rows in the new table, where the old one is kept, dependents rebuilt."""

    table: str
    rows: int
    kept_as: str
    dependents: tuple[RebuildReport, ...] = ()


def rebuildable() -> tuple[str, ...]:
    """The tables ``rebuild`` knows."""
    return (*FROM_KAFKA, *FROM_EVENTS)


def rebuild(settings: Settings, client: Client, table: str, *, batch_size: int = 50_000,
            on_batch: Callable[[ProjectorStats], None] | None = None) -> RebuildReport:
    """Rebuild ``table`` into its shadow, swap it in, keep the old one as ``<table>__previous``."""
    _check(table)
    if table not in FROM_KAFKA:
        return _recomputed(client, table)
    shadow = table + SHADOW
    _run(client, f"CREATE TABLE IF NOT EXISTS {_q(shadow)} AS {_q(table)}")
    _replay_log(settings, client, table, shadow, batch_size, on_batch)
    held = _positions(client, shadow)
    swapped_at = time.monotonic()
    _swap_in(client, table)
    _carry_over(client, table, held, swapped_at)
    _replay_log(settings, client, table, table, batch_size, on_batch)  # arrived while swapping
    return RebuildReport(table=table, rows=_count(client, table), kept_as=table + PREVIOUS,
                         dependents=_dependents(client, table))


def rollback(client: Client, table: str) -> RebuildReport:
    """Swap ``table`` with the one the last rebuild replaced; a second rollback undoes the first.

    Records the replaced table holds past the restored one's positions (projected since the
    rebuild, while a projector kept following) are carried over: a rollback never loses one.
    """
    _check(table)
    previous = table + PREVIOUS
    if not table_exists(client, previous):
        raise ProjectionError(f"{table} has no previous version to roll back to; rebuild it first",
                              code="nothing_to_roll_back")
    held = _positions(client, previous) if table in FROM_KAFKA else None
    swapped_at = time.monotonic()
    _run(client, f"EXCHANGE TABLES {_q(table)} AND {_q(previous)}")
    if held is not None:  # what was projected since the rebuild stays: a rollback never loses a record
        _carry_over(client, table, held, swapped_at)
    return RebuildReport(table=table, rows=_count(client, table), kept_as=previous,
                         dependents=_dependents(client, table))


def _positions(client: Client, table: str) -> dict[int, int]:
    """The highest Kafka offset ``table`` holds, per partition."""
    try:
        rows = client.query(f"SELECT _partition, max(_offset) FROM {_q(table)} GROUP BY _partition").result_rows
    except ClickHouseError as exc:
        raise InfraError(f"cannot read the positions of {table}: {exc}", code="rebuild_failed") from exc
    return {int(partition): int(offset) for partition, offset in rows}


def _carry_over(client: Client, table: str, held: dict[int, int], swapped_at: float) -> None:
    """Copy into ``table`` the rows its replaced version holds past ``held`` (``table``'s positions
    before the swap): a projector that kept following wrote them into the table it knew by name,
    which is the replaced one now. An insert that began before the swap (at ``swapped_at``,
    monotonic) lands in the replaced table even after it: the copy waits for the inserts the
    engine lists, and runs once more after ``LATE_INSERT_S`` for those it does not (chDB lists
    only a handle's own). A row copied twice is one row to every reader (FINAL)."""
    deadline = time.monotonic() + IN_FLIGHT_S
    while time.monotonic() < deadline and _inserts_older_than(client, table, time.monotonic() - swapped_at):
        time.sleep(0.1)
    beyond = ("multiIf(" + "".join(f"_partition = {p}, {o}, " for p, o in sorted(held.items())) + "-1)"
              if held else "-1")
    copy = (f"INSERT INTO {_q(table)} SELECT * FROM {_q(table + PREVIOUS)} WHERE _offset > {beyond} "
            f"AND (_partition, _offset) NOT IN (SELECT _partition, _offset FROM {_q(table)} WHERE _offset > {beyond})")
    _run(client, copy)
    time.sleep(LATE_INSERT_S)
    _run(client, copy)


def _inserts_older_than(client: Client, table: str, age_s: float) -> int:
    """How many inserts naming ``table`` have run for longer than ``age_s`` seconds."""
    return int(client.query(
        "SELECT count() FROM system.processes WHERE query ILIKE 'INSERT INTO%' AND elapsed > {age:Float64} "
        "AND (position(query, {plain:String}) > 0 OR position(query, {quoted:String}) > 0)",
        parameters={"age": age_s, "plain": f" {table} ", "quoted": f"`{table}`"}).result_rows[0][0])


def _dependents(client: Client, table: str) -> tuple[RebuildReport, ...]:
    """Aggregates of ``events`` recomputed after it changed: they counted the old table's inserts."""
    return tuple(_recomputed(client, derived) for derived in FROM_EVENTS) if table == "events" else ()


def _recomputed(client: Client, table: str) -> RebuildReport:
    """``table`` recomputed from ``events`` into its shadow and swapped in."""
    shadow = table + SHADOW
    _run(client, f"CREATE TABLE IF NOT EXISTS {_q(shadow)} AS {_q(table)}")
    _recompute(client, table, shadow)
    _swap_in(client, table)
    return RebuildReport(table=table, rows=_count(client, table), kept_as=table + PREVIOUS)


def _swap_in(client: Client, table: str) -> None:
    """Exchange ``table`` with its filled shadow; the old table is kept as ``<table>__previous``."""
    shadow = table + SHADOW
    _run(client, f"EXCHANGE TABLES {_q(table)} AND {_q(shadow)}")
    _run(client, f"DROP TABLE IF EXISTS {_q(table + PREVIOUS)}")
    _run(client, f"RENAME TABLE {_q(shadow)} TO {_q(table + PREVIOUS)}")


def _check(table: str) -> None:
    if table in COMPUTED or any(table in domain.views for domain in current().domains):
        raise ProjectionError(f"{table} is a view computed at query time from the log tables; it is always "
                              "current and has nothing to rebuild", code="view_not_materialized")
    if table not in FROM_KAFKA and table not in FROM_EVENTS:
        raise ProjectionError(f"unknown projection {table!r}; rebuildable: {', '.join(rebuildable())}",
                              code="unknown_view")


def _replay_log(settings: Settings, client: Client, table: str, target: str, batch_size: int,
                on_batch: Callable[[ProjectorStats], None] | None) -> None:
    with EventProjector(settings, client, source=FROM_KAFKA[table], table=target, batch_size=batch_size,
                        on_batch=on_batch) as projector:
        projector.catch_up()


def _recompute(client: Client, table: str, shadow: str) -> None:
    try:
        found = client.query("SELECT as_select FROM system.tables WHERE database = currentDatabase() "
                             "AND name = {view:String}", parameters={"view": FROM_EVENTS[table]}).result_rows
    except ClickHouseError as exc:
        raise InfraError(f"cannot read the definition of {FROM_EVENTS[table]}: {exc}",
                         code="projection_unavailable") from exc
    if not found:
        raise ProjectionError(f"{FROM_EVENTS[table]} is missing; run `keel projections migrate`",
                              code="projections_missing")
    _run(client, f"TRUNCATE TABLE {_q(shadow)}")  # one INSERT ... SELECT: nothing to resume
    _run(client, f"INSERT INTO {_q(shadow)} {found[0][0]}")


def table_exists(client: Client, table: str) -> bool:
    """Whether ``table`` is in the client's current database."""
    return bool(client.query("SELECT count() FROM system.tables WHERE database = currentDatabase() "
                             "AND name = {t:String}", parameters={"t": table}).result_rows[0][0])


def _count(client: Client, table: str) -> int:
    return int(client.query(f"SELECT count() FROM {_q(table)}").result_rows[0][0])


def _run(client: Client, statement: str) -> None:
    try:
        client.command(statement)
    except ClickHouseError as exc:
        raise InfraError(f"{statement.split(' (')[0]} failed: {exc}", code="rebuild_failed") from exc


def _q(name: str) -> str:
    return quote_identifier(name)
