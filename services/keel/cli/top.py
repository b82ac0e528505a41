"""``keel top``: a live view of the running services' metrics, for a terminal that may be 80 columns over SSH.

It reads the targets the services publish for Prometheus (``exporter.published``), so it
needs no Prometheus and sees what Prometheus would. Each refresh scrapes them all at
once (``keel.observability.scrape``) and redraws one ``Frame`` (``.overview``): plain
text in tables that fold rather than cut, no mouse, the meaning in words and not only in
colour (``NO_COLOR`` is honoured), so it reads the same under ``TERM=xterm``, in a pipe
and at 80 columns. ``--once`` prints one frame after two scrapes an interval apart, so
the rates exist; it exits 1 when no service publishes or one is down, for scripts.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from keel.cli.output import AsJson
from keel.config import Settings
from keel.observability.exporter import published, targets_dir
from keel.observability.overview import Frame, frame
from keel.observability.scrape import Scrape, scrape_all

Interval = Annotated[float, typer.Option("--interval", "-n", min=0.2, help="Seconds between refreshes.")]
Timeout = Annotated[float, typer.Option(min=0.05, help="Seconds each service has to answer a scrape.")]
Once = Annotated[bool, typer.Option("--once", help="Print one frame (two scrapes an interval apart) and exit; "
                                    "exit 1 when no service publishes metrics or one is down.")]


def register(app: typer.Typer) -> None:
    """Add ``keel top`` to ``app``."""
    app.command("top")(top)


def top(interval: Interval = 2.0, timeout: Timeout = 1.0, once: Once = False, as_json: AsJson = False) -> None:
    """Live view of each service's rate and lag, tenants, approvals, dead letters, breakers and effects."""
    settings = Settings()
    console = Console(highlight=False)
    frames = _frames(settings, interval, timeout)
    if once:
        next(frames)  # the first round has no rates yet
        view = next(frames)
        _print(console, settings, interval, view, as_json)
        raise typer.Exit(0 if view.services and not view.down else 1)
    try:
        if as_json or not console.is_terminal:  # a pipe or a log: one frame after another
            for view in frames:
                _print(console, settings, interval, view, as_json)
                if not as_json:
                    console.print()
        else:  # SIGTERM (a closed SSH session, `kill`) leaves through Live's exit, which restores the screen
            signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
            with Live(render(next(frames), settings, interval), console=console, screen=True,
                      auto_refresh=False) as live:
                for view in frames:
                    live.update(render(view, settings, interval), refresh=True)
    except KeyboardInterrupt:
        pass


def _frames(settings: Settings, interval: float, timeout: float) -> Iterator[Frame]:
    """A round of scrapes and its frame every ``interval`` seconds, the first at once (without rates).

    Rounds start an interval apart whatever a round took, and a slow round delays the next
    rather than making rounds run back to back.
    """
    before: list[Scrape] = []
    while True:
        due = time.monotonic() + interval
        now = scrape_all(published(settings), timeout)
        yield frame(now, before)
        before = now
        time.sleep(max(0.0, due - time.monotonic()))


def _print(console: Console, settings: Settings, interval: float, view: Frame, as_json: bool) -> None:
    if as_json:
        document = {"at": datetime.now(UTC).isoformat(), "topic_prefix": settings.topic_prefix,
                    "interval_s": interval, **view.as_json()}
        print(json.dumps(document), flush=True)
    else:
        console.print(render(view, settings, interval))


def render(view: Frame, settings: Settings, interval: float) -> RenderableType:
    """The whole screen: a header line, services, tenants, and the platform's backlogs."""
    up = sum(row.up for row in view.services)
    header = Text.assemble(("keel top", "bold"), f"  prefix {settings.topic_prefix}  ",
                           (f"{up}/{len(view.services)} up", "bold red" if view.down else "bold green"),
                           f"  every {interval:g}s  {datetime.now(UTC):%H:%M:%S} UTC")
    if not view.services:
        return Group(header, Text(f"no service publishes metrics under {targets_dir(settings)} for prefix "
                                  f"{settings.topic_prefix} (is `keel dev` running? KEEL_METRICS_ENABLED?)"))
    gap = Text("")
    return Group(header, services_table(view), gap, tenants_table(view), gap, backlog_table(view))


def services_table(view: Frame) -> Table:
    """One row per published service instance: up or down (and why), its work rate, its consumers' lag."""
    table = _table("services")
    table.add_column("service", min_width=16, overflow="fold")
    table.add_column("instance", max_width=14, overflow="fold")
    table.add_column("state", min_width=5, overflow="fold")  # figures keep their width: names fold instead
    table.add_column("rate/s", justify="right", min_width=6, overflow="fold")
    table.add_column("of", min_width=8, overflow="fold")
    table.add_column("lag", justify="right", min_width=5, overflow="fold")
    for row in view.services:
        state = Text("up", "green") if row.up else Text("DOWN", "bold red")
        table.add_row(row.service, row.instance, state, rate_text(row.rate), row.unit if row.up else row.error,
                      count_text(row.lag))
    return table


def tenants_table(view: Frame) -> Table:
    """Per tenant label: commands per second, decisions so far, approvals waiting now and the oldest's age."""
    table = _table("tenants (decisions since each processor started)")
    table.add_column("tenant", min_width=8, overflow="fold")
    for header in ("cmd/s", "accepted", "rejected", "parked", "waiting", "oldest"):
        table.add_column(header, justify="right", min_width=len(header), overflow="fold")
    for row in view.tenants:
        table.add_row(row.tenant, rate_text(row.rate), count_text(row.accepted), count_text(row.rejected),
                      count_text(row.parked), count_text(row.waiting), age_text(row.oldest_s))
    if not view.tenants:
        table.add_row("none yet", *("-" * 6))
    return table


def backlog_table(view: Frame) -> Table:
    """What waits or went wrong: dead letters, approvals, open breakers, effects, projection lag."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    codes = ", ".join(f"{code} {count_text(n)}" for code, n in sorted(view.dead_letters.items()) if n)
    dead = sum(view.dead_letters.values())
    table.add_row("dead letters", f"{count_text(dead)}{f' ({codes})' if codes else ''} · "
                                  f"{rate_text(view.dead_letter_rate)}/s")
    waiting = sum(row.waiting for row in view.tenants)
    oldest = max((row.oldest_s for row in view.tenants if row.oldest_s is not None), default=None)
    table.add_row("approvals", f"{count_text(waiting)} waiting · oldest {age_text(oldest)} · "
                               f"{count_text(view.approvals_overdue)} overdue")
    breakers = ", ".join(f"{tenant}/{provider}{f' ×{count_text(n)}' if n > 1 else ''}"
                         for tenant, provider, n in view.breakers)
    table.add_row("open breakers", breakers or "none")
    table.add_row("effects", f"{count_text(view.effects_held)} held · {rate_text(view.effects_settled_rate)} "
                             f"settled/s · {rate_text(view.effects_retry_rate)} retries/s")
    lags = " · ".join(f"{name} {age_text(seconds)}" for name, seconds in sorted(view.projection_lag_s.items()))
    table.add_row("projection lag", lags or "-")
    return table


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
                 show_edge=False, collapse_padding=True, header_style="bold")


def rate_text(value: float | None) -> str:
    """A per-second rate in at most 6 characters; ``-`` before there are two scrapes."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10_000 else f"{value / 1000:.0f}k"


def count_text(value: float | None) -> str:
    """A count exactly up to a million, then in millions; ``-`` when there is none."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value < 1_000_000 else f"{value / 1_000_000:.1f}M"


def age_text(seconds: float | None) -> str:
    """An age in its largest unit: 42s, 5m, 3h, 2d."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"
