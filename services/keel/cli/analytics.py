"""The analytics commands: ``keel project``, ``keel query`` and ``keel projections migrate``.

``register`` adds them to the main typer app. Each command builds its settings and
clients itself and closes them on the way out; ``keel.cli.main`` prints a ``KeelError``
as one ``[code] message`` line and exits 1.
"""

from __future__ import annotations

import signal
import sys
import threading
from enum import StrEnum
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.status import Status

from keel.config import Settings
from keel.projector.clickhouse import connect
from keel.projector.migrations import MigrationReport, apply_migrations
from keel.projector.projector import EventProjector, ProjectorStats
from keel.query.render import to_csv, to_json, to_table
from keel.query.run import run_query

_out = Console()
_err = Console(stderr=True)


class OutputFormat(StrEnum):
    """How ``keel query`` prints its result."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"


def register(app: typer.Typer) -> None:
    """Add the analytics commands and the ``projections`` group to ``app``."""
    app.command("project")(project)
    app.command("query")(query)
    projections = typer.Typer(help="ClickHouse projections (the SQL under projections/).",
                              no_args_is_help=True)
    projections.command("migrate")(migrate)
    app.add_typer(projections, name="projections")


def project(
    follow: Annotated[bool, typer.Option("--follow", help="Keep projecting new events until Ctrl-C.")] = False,
) -> None:
    """Apply projection migrations, then project the events topic into ClickHouse."""
    settings = Settings()
    client = connect(settings)
    try:
        _print_report(apply_migrations(client))
        with _out.status("projecting events…") as status, EventProjector(
            settings, client, on_batch=lambda stats: status.update(_progress(stats))
        ) as projector:
            rows = _follow(projector, status) if follow else projector.catch_up()
            stats = projector.stats
    finally:
        client.close()
    _out.print(f"projected {rows} events into {settings.clickhouse_database}.events"
               + (f"; {stats.undecodable} undecodable records logged" if stats.undecodable else ""))


def query(
    sql: Annotated[str, typer.Argument(help="One SELECT (or WITH ... SELECT) statement.")],
    output: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.TABLE,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most rows to return.")] = 1000,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds the query may run.")] = 30.0,
) -> None:
    """Run a read-only query against the projections and print the result."""
    settings = Settings()
    client = connect(settings)
    try:
        result = run_query(client, sql, limit=limit, timeout_s=timeout)
    finally:
        client.close()
    if output is OutputFormat.TABLE:
        _out.print(to_table(result))
        return
    sys.stdout.write(to_json(result) + "\n" if output is OutputFormat.JSON else to_csv(result))
    if result.truncated:
        _err.print(f"first {limit} rows shown; raise --limit for more", style="yellow", soft_wrap=True)


def migrate() -> None:
    """Apply the projection SQL files not yet applied, in order."""
    settings = Settings()
    client = connect(settings)
    try:
        report = apply_migrations(client)
    finally:
        client.close()
    _print_report(report)


def _follow(projector: EventProjector, status: Status) -> int:
    """Run until Ctrl-C, letting the current batch finish instead of abandoning it."""
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        status.update("stopping after the current batch…")
        stop.set()

    status.update("following new events (Ctrl-C to stop)…")
    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        return projector.run(stop)
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress(stats: ProjectorStats) -> str:
    undecodable = f", {stats.undecodable} undecodable" if stats.undecodable else ""
    return f"projected {stats.rows} events in {stats.batches} batches{undecodable}…"


def _print_report(report: MigrationReport) -> None:
    for name in report.applied:
        _out.print(f"applied {name}")
    if not report.applied:
        _out.print(f"projections up to date ({len(report.already_applied)} migrations applied)")
