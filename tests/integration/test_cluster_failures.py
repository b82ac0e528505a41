"""Node failures of a 3-broker cluster under load: nothing lost, nothing decided twice, order kept.

The test starts its own cluster (``keel.kafka.cluster``: three combined broker+controller
nodes on free ports, under a temporary data dir; RF 3 and ``min.insync.replicas`` 2) and runs
the platform of ``tests/broker_faults.py`` on it: a gateway, a relay, two supervised processor
workers, a supervised chainer, the projector (``keel project --follow``, on chDB) and a supervised
effect worker calling a provider simulator, with agents' commands at a steady rate (each refund
opens an effect at the payments provider). It SIGKILLs each node once, the active controller
first, keeps it down past the cluster's fencing timeout (6 s), starts it again and waits until
every partition is back in sync before the next kill.

After each kill it records when each committing worker (processors, chainer, effect worker)
committed its next batch (from its heartbeat, written every second: the figures are within
about a second), when the projector wrote the row of an event decided after the kill (from its
``_projected_at``), and how long a command sent right after the kill took from the gateway to
its event (which covers the relay), and prints them. Then the oracles: every command decided
once, in order, and chained; every effect performed once at the provider and recorded once;
ClickHouse holds exactly the events topic. A second test checks what ``keel status`` says of
the cluster, and of a cluster that lost its controller quorum. Bounded for CI (about 6 minutes
on 2 busy cores); select with ``-m cluster``. ``benchmarks/cluster_failures.py`` is the long form.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from keel.cli.main import app
from keel.config import Settings
from keel.kafka.cluster import ClusterLayout, cluster_status
from tests.broker_faults import cycle_node, in_sync, kill_node, print_resumes, running_cluster, running_services

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

DOWN_S = 7.0
"""How long a killed node stays down: past the 6 s after which the controller fences it."""
SESSION_TIMEOUT_MS = 10_000
"""The processors' group session, Keel's default: the 6 s of the single-broker fault tests is no longer
than the cluster takes to fence a dead node, so every kill would also expire the group's session."""
RESUME_BOUND_S = 120.0
"""Resuming takes about 30 s per kill (printed); a loaded machine has seen 56 s, so the bound, which only
asks that every service resumes, leaves room."""
IN_SYNC_BOUND_S = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, ClusterLayout]]:
    """A private 3-node cluster on free ports; every node stopped afterwards, whatever happened."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


def test_node_kills_under_load_lose_nothing_decide_nothing_twice_and_keep_each_aggregate_in_order(
        cluster: tuple[Settings, ClusterLayout]) -> None:
    settings, layout = cluster
    started = time.monotonic()
    figures: list[tuple[int, bool, dict[str, float | None]]] = []
    with running_services(settings, rate_per_s=40, projector=True, effects=True,
                          KEEL_PROCESSOR_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS)) as platform:
        platform.load.start()
        platform.time_a_decision(RESUME_BOUND_S)  # everything is up and deciding
        first = in_sync(settings, layout, IN_SYNC_BOUND_S)
        assert first.healthy and first.active_controller is not None, first.detail
        order = [first.active_controller, *(n.node_id for n in layout.nodes if n.node_id != first.active_controller)]
        for node_id in order:
            controller, measured = cycle_node(settings, layout, platform, node_id, down_s=DOWN_S,
                                              resume_bound_s=RESUME_BOUND_S, in_sync_bound_s=IN_SYNC_BOUND_S)
            figures.append((node_id, controller, measured))
            assert platform.load.refused == [], "the gateway refused commands during the outage"
        platform.load.stop()
        missing = platform.wait_until_decided(RESUME_BOUND_S)
        platform.effects_settled(RESUME_BOUND_S)  # their outcomes are events: the chain must hold them too
        health = platform.settled_health(RESUME_BOUND_S)
        logs = "\n".join(w.output()[-4000:] for w in platform.workers)
        print_resumes(figures)
        print(f"{len(platform.load.accepted)} commands; {time.monotonic() - started:.0f}s with the services")

        assert any(controller for _, controller, _ in figures), "the active controller was never killed"
        for node_id, _, measured in figures:
            assert measured and None not in measured.values(), f"after killing node {node_id}: {measured}\n{logs}"
        platform.assert_every_command_decided_once(missing, health, RESUME_BOUND_S)
        effects = platform.assert_effects_once(RESUME_BOUND_S)
        projected = platform.assert_projected_equals_topic(RESUME_BOUND_S)
        print(f"{effects} effects performed once each; ClickHouse holds the topic's {projected} events exactly")


def test_keel_reports_each_node_and_a_lost_controller_quorum(
        cluster: tuple[Settings, ClusterLayout]) -> None:
    settings, layout = cluster
    env = {"KEEL_DATA_DIR": str(settings.data_dir), "KEEL_KAFKA_BOOTSTRAP": layout.bootstrap}
    runner = CliRunner()
    assert in_sync(settings, layout, IN_SYNC_BOUND_S).healthy
    shown = runner.invoke(app, ["status"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "healthy" in shown.output and "active controller" in shown.output
    for node in layout.nodes:
        assert f"{layout.host}:{node.port}" in shown.output

    active = cluster_status(settings, layout).active_controller
    follower = next(n.node_id for n in layout.nodes if n.node_id != active)
    kill_node(settings, follower)
    shown = runner.invoke(app, ["status"], env=env)
    assert shown.exit_code == 1 and "degraded" in shown.output, shown.output

    kill_node(settings, next(n.node_id for n in layout.nodes if n.node_id not in (follower, active)))
    shown = runner.invoke(app, ["status"], env=env)
    assert shown.exit_code == 1, shown.output
    assert "controller quorum lost: 1 of 3 controllers up, 2 needed" in shown.output, shown.output
