"""``keel watch stats|breakers|approvals`` (run a watcher) and ``keel stats`` (show its counts).

Each command builds ``Settings()`` itself, so ``KEEL_*`` variables point it at any
broker and topic prefix. ``keel.cli.main`` prints Keel errors as one red line and exits 1.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from keel.cli import output
from keel.cli.output import AsJson
from keel.cli.tenancy import require_known
from keel.config import Settings
from keel.watchers.stats_tally import StatsRow, minutes_since, summarise

if TYPE_CHECKING:
    import faust

_LOGLEVELS = ("debug", "info", "warning", "error")


def register(app: typer.Typer) -> None:
    """Add ``keel watch ...`` and ``keel stats`` to ``app``."""
    watch = typer.Typer(help="Run a watcher (faust worker) in the foreground.", no_args_is_help=True)
    watch.command("stats")(watch_stats)
    watch.command("breakers")(watch_breakers)
    watch.command("approvals")(watch_approvals)
    app.add_typer(watch, name="watch")
    app.command("stats")(stats)


_Loglevel = Annotated[str, typer.Option(help=f"Keel's log level: {', '.join(_LOGLEVELS)}.")]
_FaustLoglevel = Annotated[str, typer.Option(
    help="Log level of faust, mode and aiokafka (chatty below warning).")]


def _check_levels(*levels: str) -> None:
    for level in levels:
        if level.lower() not in _LOGLEVELS:
            raise typer.BadParameter(f"{level!r} is not one of {', '.join(_LOGLEVELS)}")


def watch_stats(loglevel: _Loglevel = "info", faust_loglevel: _FaustLoglevel = "warning") -> None:
    """Count commands and decisions per tenant and minute until stopped (Ctrl-C / SIGTERM)."""
    _check_levels(loglevel, faust_loglevel)
    from keel.watchers.stats import build_app  # faust is slow to import: only here

    settings = Settings()
    _run(settings, build_app(settings), loglevel, faust_loglevel)


def watch_breakers(loglevel: _Loglevel = "info", faust_loglevel: _FaustLoglevel = "warning") -> None:
    """Trip an agent's breaker when too many of its decisions are rejected (KEEL_BREAKER_*)."""
    _check_levels(loglevel, faust_loglevel)
    from keel.watchers.breaker import build_app
    from keel.watchers.breaker_rules import BreakerSettings

    settings = Settings()
    _run(settings, build_app(settings, BreakerSettings()), loglevel, faust_loglevel)


def watch_approvals(loglevel: _Loglevel = "info", faust_loglevel: _FaustLoglevel = "warning") -> None:
    """Send ExpireApproval for approvals past their deadline (KEEL_APPROVALS_*)."""
    _check_levels(loglevel, faust_loglevel)
    from keel.watchers.approvals import build_app
    from keel.watchers.approvals_rules import ApprovalSettings

    settings = Settings()
    _run(settings, build_app(settings, ApprovalSettings()), loglevel, faust_loglevel)


def _run(settings: Settings, app: faust.App, loglevel: str, faust_loglevel: str) -> None:
    """Create the app's internal topics, then run it as a worker in the foreground."""
    from keel.watchers.common import declare_internal_topics
    from keel.watchers.worker import run_worker

    from keel.observability import exporter

    declare_internal_topics(settings, app)
    exporter.start(settings, str(app.conf.id).removeprefix(f"{settings.topic_prefix}."))
    run_worker(app, loglevel=loglevel, library_loglevel=faust_loglevel)


def stats(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    minutes: Annotated[int, typer.Option(min=1, help="How many recent minutes to show.")] = 15,
    as_json: AsJson = False,
) -> None:
    """Show commands, accepted and rejected decisions per tenant and minute."""
    from keel.watchers.stats_reader import read_windows

    settings = Settings()
    windows = read_windows(settings)
    rows = summarise(windows, tenant=tenant, since=minutes_since(minutes, datetime.now(UTC)))
    empty = f"no stats in the last {minutes} minute(s)"
    if tenant is not None and not rows:
        seen = bool(summarise(windows, tenant=tenant))  # older windows are still a trace of it
        require_known(settings, tenant, seen=seen)
        empty = f"{empty} for tenant {tenant}" if seen else f"tenant {tenant} has no stats yet"
    records = [{"minute": row.minute.isoformat(), "tenant": row.tenant, "commands": row.counts.commands,
                "accepted": row.counts.accepted, "rejected": row.counts.rejected,
                "undecodable": row.counts.undecodable} for row in rows]
    output.emit(records, as_json=as_json, shown=render(rows), empty=empty)


def render(rows: list[StatsRow]) -> Table:
    """The rows as a rich table, one line per minute and tenant."""
    table = Table(title="commands and decisions per minute")
    for header in ("minute (UTC)", "tenant", "commands", "accepted", "rejected", "undecodable"):
        table.add_column(header, justify="left" if header in ("minute (UTC)", "tenant") else "right")
    for row in rows:
        counts = row.counts
        table.add_row(row.minute.strftime("%Y-%m-%d %H:%M"), row.tenant, str(counts.commands),
                      str(counts.accepted), str(counts.rejected), str(counts.undecodable))
    return output.fold(table)
