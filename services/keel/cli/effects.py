"""``keel effects``: run effect workers, and see, retry and cancel effects.

``keel effects run`` is supervised like ``keel process``: a parent starts the workers in a
child process and restarts it when it ends or stalls; ``--no-supervise`` runs them in the
foreground for a platform that restarts processes itself. ``--workers N`` runs N members
of the effect worker group in the process, each with its own event loop, consumer and
producer; for more CPU, run more processes (every one joins the same group).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Annotated

import typer

from keel.cli import effects_ops
from keel.cli.workers import Supervise
from keel.config import Settings
from keel.logs import configure_logging
from keel.observability import exporter as metrics
from keel.observability.tracing import configure_tracing
from keel.supervision import collector
from keel.supervision.progress import Progress
from keel.supervision.supervisor import run_watched, supervise

ROLE = "effects"
"""The role in the heartbeat file's name (``keel.supervision.progress.heartbeat_path``)."""


def register(app: typer.Typer) -> None:
    """Add the ``effects`` group to ``app``."""
    group = typer.Typer(help="Effects: decided events carried into the outside world.", no_args_is_help=True)
    group.command("run")(run)
    effects_ops.register(group)
    app.add_typer(group, name="effects")


def run(
    workers: Annotated[int, typer.Option(min=1, help="Members of the effect worker group to run in this process.")] = 1,
    instance: Annotated[str | None, typer.Option(help="Instance id (names the heartbeat and the workers).")] = None,
    supervised: Supervise = True,
) -> None:
    """Run effect workers: call each recorded effect's handler and record its outcome (JSON logs on stderr)."""
    from keel.effects.group import EffectWorkerGroup

    configure_logging(json_lines=True)
    settings = Settings()
    name = instance or settings.effects_instance
    if supervised:
        supervise([sys.executable, "-m", "keel.cli", "effects", "run", "--no-supervise", "--instance", name,
                   "--workers", str(workers)], settings, ROLE, name)
        return
    configure_tracing("effects")  # the child that runs the effects (off unless OTEL_* say so)

    def build(progress: Progress) -> EffectWorkerGroup:
        group = EffectWorkerGroup(settings, name, workers, progress)
        # A worker holds thousands of buffered effects alive: full collections walking them took a
        # third of its loop at the default thresholds (benchmarks/effects.py).
        collector.settle()
        return group

    metrics.start(settings, "effects", name)
    run_watched(settings, ROLE, name, build)
    if any(thread.name.startswith("effect-handler") for thread in threading.enumerate()):
        # A synchronous handler past its timeout still holds its thread, and the interpreter
        # would wait for it at exit: the workers have stopped and committed, so end now.
        logging.shutdown()
        os._exit(0)
