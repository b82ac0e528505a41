"""Broker restarts under load, the long form of ``tests/integration/test_broker_restarts.py``.

Starts a private broker (its own data dir and ports, so no user data is touched), a
gateway, a relay and two supervised processor workers, sends agents' commands over HTTP
at a steady rate, and SIGKILLs the broker ``--kills`` times; every third outage outlasts
the transaction timeout. Prints how long decisions took to resume after each restart,
how many commands were acknowledged and decided, and the load average. It fails only
when a command was lost or decided twice, or decisions did not resume.

    .venv/bin/python benchmarks/broker_restarts.py --kills 10 --rate 100
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests package

from keel.config import Settings  # noqa: E402
from tests.broker_faults import TRANSACTION_TIMEOUT_MS, running_platform  # noqa: E402

RESUME_BOUND_S = 180.0


def main(kills: int = typer.Option(10, help="Broker SIGKILLs."),
         rate: float = typer.Option(100.0, help="Commands per second sent through the gateway."),
         up_s: float = typer.Option(10.0, help="Seconds the broker serves between kills."),
         short_outage_s: float = typer.Option(3.0, help="Seconds a short outage lasts."),
         ) -> None:
    """Kill and restart the broker under load; print the resume times and the exactly-once checks."""
    console = Console()
    long_outage_s = TRANSACTION_TIMEOUT_MS / 1000 + 8.0
    rows: list[tuple[int, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="keel-restarts-") as folder, \
            running_platform(Settings(), Path(folder), rate_per_s=rate) as platform:
        platform.load.start()
        platform.time_a_decision(RESUME_BOUND_S)
        for kill in range(1, kills + 1):
            time.sleep(up_s)
            down_s = long_outage_s if kill % 3 == 2 else short_outage_s
            platform.kill_broker()
            rows.append((kill, down_s, platform.restart_broker_after(down_s, RESUME_BOUND_S)))
            console.print(f"kill {kill}: down {down_s:.0f}s, decisions resumed {rows[-1][2]:.1f}s after the restart")
        platform.load.stop()
        missing = platform.wait_until_decided(RESUME_BOUND_S)
        health = platform.settled_health(RESUME_BOUND_S)
        decided_twice = sum(len(platform.collector.events[c]) > 1 for c in platform.load.accepted)
        event_ids = Counter(e.id for events in platform.collector.events.values() for e in events)
        restarts = sum(w.count("ending the process") + w.count("is frozen") for w in platform.workers)
        rebuilds = sum(w.count("starting again under a new producer") for w in platform.workers)

    table = Table(title="decisions resumed after a broker restart")
    for column in ("kill", "down s", "resumed after s"):
        table.add_column(column, justify="right")
    for kill, down_s, resumed_s in rows:
        table.add_row(str(kill), f"{down_s:.0f}", f"{resumed_s:.1f}")
    console.print(table)
    resumes = [r for *_, r in rows]
    console.print(f"resume: median {statistics.median(resumes):.1f}s, max {max(resumes):.1f}s; "
                  f"acknowledged {len(platform.load.accepted)}, undecided {len(missing)}, decided twice "
                  f"{decided_twice}, events written twice {sum(n > 1 for n in event_ids.values())}; "
                  f"stalled workers restarted {restarts}, rebuilt in place {rebuilds}; "
                  f"workers at the end {health}; load average {os.getloadavg()}")
    if missing or decided_twice or any(n > 1 for n in event_ids.values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
