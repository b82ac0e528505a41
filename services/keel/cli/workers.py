"""``keel process`` (a command processor worker) and ``keel health`` (a worker's liveness and readiness).

A worker runs supervised by default: ``keel process`` is a parent that starts the worker
as a child, restarts it when it ends or stalls, and logs each restart
(``keel.supervision.supervisor``). ``--no-supervise`` runs the watched worker in the
foreground for a platform that restarts processes itself, with ``keel health`` as its
liveness check.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console

from keel.config import Settings
from keel.logs import configure_logging
from keel.observability import exporter as metrics
from keel.observability.tracing import configure_tracing
from keel.supervision.progress import Heartbeat, heartbeat_path, liveness
from keel.supervision.supervisor import run_watched, supervise

_out = Console()
STALE_AFTER_S = 10.0  # the watchdog writes every second


class Role(StrEnum):
    """The workers that write heartbeats."""

    PROCESSOR = "processor"
    CHAINER = "chainer"
    EFFECTS = "effects"


Supervise = Annotated[bool, typer.Option(
    "--supervise/--no-supervise",
    help="Run the worker in a child process that is restarted whenever it ends or stalls (default); "
         "--no-supervise runs it in this process, for systemd or Kubernetes to restart "
         "(liveness: `keel health ROLE --instance ID`).")]


def register(app: typer.Typer) -> None:
    """Add ``keel process`` and ``keel health`` to ``app``."""
    app.command("process")(process)
    app.command("health")(health)


def process(
    instance: Annotated[str | None, typer.Option(help="Worker instance id (part of its transactional.id).")] = None,
    caught_up: Annotated[bool, typer.Option("--until-caught-up", help="Exit once the backlog is decided.")] = False,
    supervised: Supervise = True,
) -> None:
    """Run a command processor worker (JSON logs on stderr)."""
    from keel.processor.worker import CommandProcessor

    configure_logging(json_lines=True)
    if caught_up or not supervised:  # the process that decides traces (off unless OTEL_* say so)
        configure_tracing("processor")
    settings = Settings()
    name = instance or settings.processor_instance
    if caught_up:
        processor = CommandProcessor(settings, instance_id=name)
        try:
            _out.print(processor.run_until_caught_up(timeout_s=300))
        finally:
            processor.close()
    elif supervised:
        supervise(child_argv("process", name), settings, Role.PROCESSOR, name)
    else:
        metrics.start(settings, "processor", name)  # the child that decides exposes; its supervisor does not
        run_watched(settings, Role.PROCESSOR, name,
                    lambda progress: CommandProcessor(settings, instance_id=name, progress=progress))


def child_argv(command: str, instance: str) -> list[str]:
    """The command line of the watched worker a supervisor starts."""
    return [sys.executable, "-m", "keel.cli", command, "--no-supervise", "--instance", instance]


def health(
    role: Annotated[Role, typer.Argument(help="Which worker.")],
    instance: Annotated[str, typer.Option(help="Its instance id.")] = "0",
    as_json: Annotated[bool, typer.Option("--json", help="Print the heartbeat as JSON.")] = False,
    ready: Annotated[bool, typer.Option("--ready", help="Readiness: also exit 1 while the worker is not "
                                        "ready (its broker away, or it is starting or backing off).")] = False,
) -> None:
    """Whether a worker is live: its heartbeat is fresh and no step of its loop is stalled; exits 1 if not."""
    beat = Heartbeat.read(heartbeat_path(Settings(), role, instance))
    live_problem = liveness(beat, time.time(), STALE_AFTER_S)
    unready = None if beat is None or beat.ready else f"not ready: {beat.not_ready}"
    problem = unready if ready and live_problem is None else live_problem
    if as_json:
        print(json.dumps({"live": live_problem is None, "ready": live_problem is None and unready is None,
                          "problem": problem, "heartbeat": beat and asdict(beat)}))
    elif problem is not None:
        _out.print(f"[red]not {'ready' if ready else 'live'}[/red]: {role} {instance}: {problem}",
                   highlight=False, soft_wrap=True)
    else:
        assert beat is not None  # a live worker has a heartbeat
        commit = "none yet" if beat.last_commit_age_s is None else f"{beat.last_commit_age_s:.1f}s ago"
        state = "ready" if beat.ready else f"live, {unready}"
        _out.print(f"[green]{state}[/green]: {role} {instance} (pid {beat.pid}): {beat.step} for "
                   f"{beat.step_age_s:.1f}s, {beat.partitions} partitions, last commit {commit}",
                   highlight=False, soft_wrap=True)
    raise typer.Exit(0 if problem is None else 1)
