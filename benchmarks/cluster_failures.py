"""Node failures of a 3-broker cluster under load, the long form of ``tests/integration/test_cluster_failures.py``.

Starts a private 3-node cluster (its own temporary data dir and free ports, so no user data
is touched) and the whole platform on it: a gateway, a relay, two supervised processor
workers, a supervised chainer, the projector on chDB and a supervised effect worker calling
a provider simulator, with agents' commands over HTTP at a steady rate. SIGKILLs the nodes
round-robin ``--kills`` times, the active controller first, each kept down past the
cluster's fencing timeout and brought back in sync before the next. Prints how long each
service took to resume after each kill, the exactly-once oracles (commands decided once, in
order and chained; effects performed once; ClickHouse equal to the events topic) and the
load average. Exits 1 when an oracle fails or a service did not resume.

    .venv/bin/python benchmarks/cluster_failures.py --kills 9 --rate 40
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests package

from keel.kafka.cluster import cluster_status  # noqa: E402
from tests.broker_faults import cycle_node, in_sync, running_cluster, running_services  # noqa: E402

FENCING_S = 6.0
"""How long after a node's last heartbeat the controller fences it."""
SESSION_TIMEOUT_MS = 10_000
"""The processors' group session, Keel's default (see the test)."""
RESUME_BOUND_S = 120.0
IN_SYNC_BOUND_S = 120.0


def main(kills: int = typer.Option(9, min=1, help="Node SIGKILLs, round-robin, the active controller first."),
         rate: float = typer.Option(40.0, help="Commands per second sent through the gateway."),
         down_s: float = typer.Option(7.0, help=f"Seconds a killed node stays down (past the {FENCING_S:.0f} s "
                                                "fencing timeout)."),
         up_s: float = typer.Option(5.0, help="Seconds the cluster serves, in sync, between kills."),
         ) -> None:
    """Kill and restart cluster nodes under load; print the resume times and the exactly-once oracles."""
    if down_s <= FENCING_S:
        raise typer.BadParameter(f"--down-s must outlast the {FENCING_S:.0f} s fencing timeout")
    console = Console(width=140)  # the table whole, in a log file too
    rows: list[tuple[int, int, bool, dict[str, float | None]]] = []
    oracles: dict[str, str] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keel-cluster-failures-") as folder, \
            running_cluster(Path(folder)) as (settings, layout), \
            running_services(settings, rate_per_s=rate, projector=True, effects=True,
                             KEEL_PROCESSOR_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS)) as platform:
        platform.load.start()
        platform.time_a_decision(RESUME_BOUND_S)
        first = in_sync(settings, layout, IN_SYNC_BOUND_S)
        if not first.healthy or first.active_controller is None:
            raise RuntimeError(f"the cluster is not healthy before the first kill: {first.detail}")
        order = [first.active_controller, *(n.node_id for n in layout.nodes if n.node_id != first.active_controller)]
        for kill in range(1, kills + 1):
            time.sleep(up_s)
            node_id = order[(kill - 1) % len(order)]
            controller, measured = cycle_node(settings, layout, platform, node_id, down_s=down_s,
                                              resume_bound_s=RESUME_BOUND_S, in_sync_bound_s=IN_SYNC_BOUND_S)
            rows.append((kill, node_id, controller, measured))
            console.print(f"kill {kill}: node {node_id}{' (active controller)' if controller else ''}, "
                          f"resumed after {measured}; now {cluster_status(settings, layout).detail}")
        platform.load.stop()
        missing = platform.wait_until_decided(RESUME_BOUND_S)
        effects, _ = platform.effects_settled(RESUME_BOUND_S)
        health = platform.settled_health(RESUME_BOUND_S)
        checks: dict[str, Callable[[], object]] = {
            "commands: none lost or decided twice, in order, chained":
                lambda: platform.assert_every_command_decided_once(missing, health, RESUME_BOUND_S),
            "effects: each performed and recorded once": lambda: platform.assert_effects_once(RESUME_BOUND_S),
            "ClickHouse equals the events topic": lambda: platform.assert_projected_equals_topic(RESUME_BOUND_S),
        }
        for name, check in checks.items():
            try:
                check()
                oracles[name] = "ok"
            except AssertionError as failed:
                oracles[name] = f"FAILED: {str(failed)[:600]}"
        accepted, refused = len(platform.load.accepted), len(platform.load.refused)

    services = list(rows[0][3]) if rows else []
    table = Table(title="seconds from a node's SIGKILL until each service resumed")
    for column in ("kill", "node", *services):
        table.add_column(column, justify="right")
    for kill, node_id, controller, measured in rows:
        table.add_row(str(kill), f"{node_id}{' (ctl)' if controller else ''}",
                      *("never" if measured.get(s) is None else f"{measured[s]:.1f}" for s in services))
    console.print(table)
    for name, result in oracles.items():
        console.print(f"{name}: {result}", highlight=False)
    console.print(f"{accepted} commands acknowledged ({refused} refused), {len(missing)} undecided, "
                  f"{len(effects)} effects; {time.monotonic() - started:.0f}s in all; "
                  f"load average {os.getloadavg()}", highlight=False)
    never = [kill for kill, *_, measured in rows if not measured or None in measured.values()]
    if never or refused or not any(controller for _, _, controller, _ in rows) \
            or any(result != "ok" for result in oracles.values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
