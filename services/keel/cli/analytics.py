"""The analytics commands: ``keel project``, ``keel query`` and ``keel projections migrate|rebuild|rollback``.

``register`` adds them to the main typer app. Each command builds its settings and
clients itself and closes them on the way out; ``keel.cli.main`` prints a ``KeelError``
as one ``[code] message`` line and exits 1.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from types import FrameType
from typing import Annotated

import typer
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.exceptions import ClickHouseError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.status import Status

from keel.analytics import owner
from keel.analytics.server import EngineServer
from keel.cli import output as out
from keel.cli.tenancy import require_known
from keel.config import Settings
from keel.logs import configure_logging
from keel.errors import InfraError, QueryError
from keel.kafka.topics import Topic
from keel.observability import exporter as metrics
from keel.observability.tracing import configure_tracing
from keel.projector.clickhouse import connect
from keel.projector.migrations import MigrationReport, apply_migrations
from keel.projector.projector import PROJECTED_TOPICS, EventProjector, ProjectorStats
from keel.query.render import to_csv, to_json, to_table
from keel.query.service import execute
from keel.replay.rebuild import rebuild, rebuildable, rollback
from keel.supervision import collector

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
    projections.command("rebuild")(rebuild_view)
    projections.command("rollback")(rollback_view)
    app.add_typer(projections, name="projections")


def project(
    follow: Annotated[bool, typer.Option("--follow", help="Keep projecting new records until Ctrl-C.")] = False,
) -> None:
    """Apply projection migrations, then project the events and commands topics into ClickHouse.

    With ``--follow`` on the embedded engine, this process owns it and serves every other
    process's reads and maintenance (queries, state, rebuilds, redaction) while it projects.
    """
    settings = Settings()
    configure_tracing("projector")  # off unless OTEL_* say so
    client = connect(settings)
    try:
        _print_report(apply_migrations(client))
    finally:
        client.close()
    if follow:  # a service: JSON log lines on stderr (the progress line stays on stdout), and /metrics
        configure_logging(json_lines=True)
        metrics.start(settings, "projector")
    with _out.status("projecting…") as status, _serving(settings, follow):
        stats = _follow(settings, status) if follow else {
            source: _project_once(settings, source, status) for source in PROJECTED_TOPICS}
    for source, done in stats.items():
        _out.print(f"projected {done.rows} records into {settings.clickhouse_database}.{source.value}"
                   + (f"; {done.undecodable} undecodable records logged" if done.undecodable else ""))


@contextmanager
def _serving(settings: Settings, serve: bool) -> Iterator[None]:
    """Serve the embedded engine this process opened to the others, for as long as it projects."""
    path = settings.analytics_dsn.removeprefix("chdb://")
    if not serve or path == settings.analytics_dsn:  # a ClickHouse server serves itself
        yield
        return
    server = EngineServer(path)
    port = server.start()
    owner.publish(settings, port)
    _out.print(f"serving the embedded ClickHouse to other processes on 127.0.0.1:{port}", highlight=False)
    try:
        yield
    finally:
        owner.withdraw(settings)
        server.close()


def _project_once(settings: Settings, source: Topic, status: Status) -> ProjectorStats:
    client = connect(settings)
    try:
        with EventProjector(settings, client, source=source,
                            on_batch=lambda stats: status.update(_progress(source, stats))) as projector:
            projector.catch_up()
            stats = projector.stats
    finally:
        client.close()
    return stats


def query(
    sql: Annotated[str, typer.Argument(help="One SELECT (or WITH ... SELECT) statement.")],
    tenant: Annotated[str | None, typer.Option("--tenant", help="The tenant whose rows the query sees.")] = None,
    all_tenants: Annotated[bool, typer.Option("--all-tenants", help="Ops: see every tenant's rows.")] = False,
    output: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.TABLE,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most rows to return.")] = 1000,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds the query may run.")] = 30.0,
    as_json: out.AsJson = False,
) -> None:
    """Run a read-only query over one tenant's projections (or, for ops, every tenant's)."""
    if (tenant is None) == (not all_tenants):
        raise QueryError("pass exactly one of --tenant T (analysts) or --all-tenants (ops)",
                         code="scope_required")
    if as_json:
        output = OutputFormat.JSON
    settings = Settings()
    projected = True
    if tenant is not None:
        projected = _projected(settings, tenant)
        require_known(settings, tenant, seen=projected)
    result = execute(settings, sql, tenant=tenant, limit=limit, timeout_s=timeout)
    idle = None if projected else f"tenant {tenant} has no projected data yet (`keel project` loads it)"
    if output is OutputFormat.TABLE:
        if idle:
            out.say(idle)
        else:
            out.console().print(out.fold(to_table(result)))
        return
    sys.stdout.write(to_json(result) + "\n" if output is OutputFormat.JSON else to_csv(result))
    if idle:
        out.note(idle)
    if result.truncated:
        _err.print(f"first {limit} rows shown; raise --limit for more", style="yellow", soft_wrap=True)


def _projected(settings: Settings, tenant: str) -> bool:
    """Whether the raw projections (events, commands) hold any row of ``tenant``."""
    client = connect(settings)
    try:
        present = {str(name) for (name,) in client.query(
            "SELECT name FROM system.tables WHERE database = {db:String} AND name IN ('events', 'commands')",
            parameters={"db": settings.clickhouse_database}).result_rows}
        database = quote_identifier(settings.clickhouse_database)
        return any(client.query(f"SELECT 1 FROM {database}.{quote_identifier(table)} "
                                "WHERE tenant_id = {tenant:String} LIMIT 1", parameters={"tenant": tenant}).result_rows
                   for table in sorted(present))
    except ClickHouseError as exc:
        raise InfraError(f"cannot read the projections of {settings.clickhouse_database}: {exc}",
                         code="projection_unavailable") from exc
    finally:
        client.close()


def migrate() -> None:
    """Apply the projection SQL files not yet applied, in order."""
    settings = Settings()
    client = connect(settings)
    try:
        report = apply_migrations(client)
    finally:
        client.close()
    _print_report(report)


def rebuild_view(
    view: Annotated[str, typer.Argument(help=f"The table to rebuild: {', '.join(rebuildable())}.")],
) -> None:
    """Rebuild a projection into a shadow table, swap it in atomically, keep the old one for rollback."""
    settings = Settings()
    client = connect(settings)
    try:
        apply_migrations(client)
        with Progress(TextColumn("rebuilding {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]:,.0f} rows/s"), TimeRemainingColumn(), console=_err) as bar:
            task = bar.add_task(view, total=None, rate=0.0)
            started = time.monotonic()
            report = rebuild(settings, client, view, on_batch=lambda stats: bar.update(
                task, completed=stats.rows, rate=stats.rows / max(time.monotonic() - started, 1e-6)))
    finally:
        client.close()
    for done in (report, *report.dependents):
        _out.print(f"rebuilt {done.table}: {done.rows} rows; the old table is kept as {done.kept_as} "
                   f"(`keel projections rollback {done.table}`)")


def rollback_view(
    view: Annotated[str, typer.Argument(help="The table whose last rebuild to undo.")],
) -> None:
    """Swap a projection back to the table its last rebuild replaced (run again to undo)."""
    settings = Settings()
    client = connect(settings)
    try:
        report = rollback(client, view)
    finally:
        client.close()
    _out.print(f"rolled back {report.table}: {report.rows} rows; the replaced table is kept as {report.kept_as}")
    for done in report.dependents:
        _out.print(f"recomputed {done.table} from it: {done.rows} rows")


def _follow(settings: Settings, status: Status) -> dict[Topic, ProjectorStats]:
    """One projector thread per topic until Ctrl-C; each finishes its current batch first."""
    stop = threading.Event()
    stats: dict[Topic, ProjectorStats] = {}
    failures: list[BaseException] = []

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        status.update("stopping after the current batch…")
        stop.set()

    def follow(source: Topic) -> None:
        client = connect(settings)
        try:
            with EventProjector(settings, client, source=source,
                                on_batch=lambda done: status.update(_progress(source, done))) as projector:
                projector.run(stop)
                stats[source] = projector.stats
        except BaseException as exc:  # surfaced by the main thread after the others stop
            failures.append(exc)
            stop.set()
        finally:
            client.close()

    status.update("following new records (Ctrl-C to stop)…")
    previous = signal.signal(signal.SIGINT, request_stop)
    previous_term = signal.signal(signal.SIGTERM, request_stop)  # keel dev and keel down stop it so
    threads = [threading.Thread(target=follow, args=(source,), name=f"project-{source.value}")
               for source in PROJECTED_TOPICS]
    collector.settle()
    try:
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(0.2)
    finally:
        stop.set()
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    if failures:
        raise failures[0]
    return stats


def _progress(source: Topic, stats: ProjectorStats) -> str:
    undecodable = f", {stats.undecodable} undecodable" if stats.undecodable else ""
    return f"projected {stats.rows} {source.value} in {stats.batches} batches{undecodable}…"


def _print_report(report: MigrationReport) -> None:
    for name in report.applied:
        _out.print(f"applied {name}")
    if not report.applied:
        _out.print(f"projections up to date ({len(report.already_applied)} migrations applied)")
