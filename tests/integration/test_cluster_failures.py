"""Node failures of a 3-broker cluster under load: nothing lost, nothing decided twice, order kept.

The test starts its own cluster (``keel.kafka.cluster``: three combined broker+controller
nodes on free ports, under a temporary data dir; RF 3 and ``min.insync.replicas`` 2) and runs
the platform of ``tests/broker_faults.py`` on it: a gateway, a relay, two supervised processor
workers and a supervised chainer, with agents' commands at a steady rate. It SIGKILLs each
node once, the active controller first, keeps it down past the cluster's fencing timeout
(6 s), starts it again and waits until every partition is back in sync before the next kill.

After each kill it records when each transactional worker committed its next batch (from its
heartbeat, written every second: the figures are within about a second) and how long a
command sent right after the kill took from the gateway to its event (which covers the
relay), and prints them. A second test checks what ``keel status`` says of the cluster, and
of a cluster that lost its controller quorum. Bounded for CI (about 3 minutes on 2 cores);
select with ``-m cluster``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keel.cli.main import app
from keel.config import Settings
from keel.kafka.cluster import (
    ClusterLayout,
    ClusterStatus,
    cluster_status,
    node_paths,
    plan_cluster,
    start_cluster,
    stop_cluster,
)
from keel.supervision.progress import Heartbeat, heartbeat_path
from tests.broker_faults import WORKERS, Platform, free_port, running_services

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

DOWN_S = 7.0
"""How long a killed node stays down: past the 6 s after which the controller fences it."""
SESSION_TIMEOUT_MS = 10_000
"""The processors' group session, Keel's default: the 6 s of the single-broker fault tests is no longer
than the cluster takes to fence a dead node, so every kill would also expire the group's session."""
RESUME_BOUND_S = 60.0
IN_SYNC_BOUND_S = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, ClusterLayout]]:
    """A private 3-node cluster on free ports; every node stopped afterwards, whatever happened."""
    folder = tmp_path_factory.mktemp("cluster")
    base = Settings(data_dir=folder, kafka_start_timeout_s=120.0)
    layout = plan_cluster(base, 3, [(free_port(), free_port()) for _ in range(3)])
    settings = base.model_copy(update={"kafka_bootstrap": layout.bootstrap, "replication_factor": 3,
                                       "min_insync_replicas": 2})
    try:
        start_cluster(settings, layout)
        yield settings, layout
    finally:
        stop_cluster(settings, layout)


def kill_node(settings: Settings, node_id: int) -> float:
    """SIGKILL node ``node_id``, as a crash would; the wall-clock time of the kill."""
    pid = int(node_paths(settings, node_id).pid_file.read_text())
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed_at


def in_sync(settings: Settings, layout: ClusterLayout, bound_s: float) -> ClusterStatus:
    """The status once every node serves and no partition is under-replicated (or as it is after ``bound_s``)."""
    deadline = time.monotonic() + bound_s
    while True:
        status = cluster_status(settings, layout)
        if status.healthy or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def resumes(platform: Platform, killed_at: float, bound_s: float) -> dict[str, float | None]:
    """Seconds from ``killed_at`` until each transactional worker's next commit, and until a command sent
    right after the kill was decided (``end-to-end``); ``None`` for what did not resume within ``bound_s``."""
    workers = {f"processor {name}": heartbeat_path(platform.settings, "processor", name) for name in WORKERS}
    workers["chainer c1"] = heartbeat_path(platform.settings, "chainer", "c1")
    found: dict[str, float | None] = {name: None for name in [*workers, "end-to-end"]}
    sent, since_kill = time.monotonic(), time.time() - killed_at
    probe = platform.load.submit()
    assert probe is not None, f"the gateway refused a command: {platform.load.refused[-1:]}"
    deadline = sent + bound_s
    while time.monotonic() < deadline and None in found.values():
        for name, path in workers.items():
            beat = Heartbeat.read(path)
            if found[name] is None and beat is not None and beat.last_commit_age_s is not None:
                committed_at = beat.written_at - beat.last_commit_age_s
                if committed_at > killed_at:
                    found[name] = round(committed_at - killed_at, 1)
        decided = platform.collector.decided(probe)
        if found["end-to-end"] is None and decided is not None:
            found["end-to-end"] = round(decided - sent + since_kill, 1)
        time.sleep(0.2)
    return found


def test_node_kills_under_load_lose_nothing_decide_nothing_twice_and_keep_each_aggregate_in_order(
        cluster: tuple[Settings, ClusterLayout]) -> None:
    settings, layout = cluster
    started = time.monotonic()
    figures: list[tuple[int, bool, dict[str, float | None]]] = []
    with running_services(settings, rate_per_s=40,
                          KEEL_PROCESSOR_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS)) as platform:
        platform.load.start()
        platform.time_a_decision(RESUME_BOUND_S)  # everything is up and deciding
        first = in_sync(settings, layout, IN_SYNC_BOUND_S)
        assert first.healthy and first.active_controller is not None, first.detail
        order = [first.active_controller, *(n.node_id for n in layout.nodes if n.node_id != first.active_controller)]
        for node_id in order:
            controller = cluster_status(settings, layout).active_controller == node_id
            killed_at = kill_node(settings, node_id)
            measured: dict[str, float | None] = {}
            measuring = threading.Thread(target=lambda: measured.update(resumes(platform, killed_at, RESUME_BOUND_S)))
            measuring.start()
            time.sleep(DOWN_S)
            during = cluster_status(settings, layout)
            assert not during.quorum_lost and during.active_controller not in (None, node_id), during.detail
            start_cluster(settings, layout)
            back = in_sync(settings, layout, IN_SYNC_BOUND_S)
            assert back.healthy, f"after node {node_id} came back: {back.detail}"
            measuring.join()
            figures.append((node_id, controller, measured))
            assert platform.load.refused == [], "the gateway refused commands during the outage"
        platform.load.stop()
        missing = platform.wait_until_decided(RESUME_BOUND_S)
        health = platform.settled_health(RESUME_BOUND_S)
        logs = "\n".join(w.output()[-4000:] for w in platform.workers)
        for node_id, controller, measured in figures:
            print(f"killed node {node_id}{' (active controller)' if controller else ''}: resumed after "
                  + ", ".join(f"{name} {'never' if s is None else f'{s}s'}" for name, s in measured.items()))
        print(f"{len(platform.load.accepted)} commands; {time.monotonic() - started:.0f}s with the services")

        assert any(controller for _, controller, _ in figures), "the active controller was never killed"
        for node_id, _, measured in figures:
            assert measured and None not in measured.values(), f"after killing node {node_id}: {measured}\n{logs}"
        platform.assert_every_command_decided_once(missing, health, RESUME_BOUND_S)


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
