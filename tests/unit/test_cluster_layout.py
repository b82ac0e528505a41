"""The local cluster's layout, what Settings derive from it, and how its health reads (no broker needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from keel.cli.main import main
from keel.config import Settings
from keel.errors import InfraError
from keel.kafka.cluster import ClusterStatus, NodeStatus, layout_path, plan_cluster, recorded_cluster


@pytest.fixture(autouse=True)
def _no_explicit_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEEL_KAFKA_BOOTSTRAP", "KEEL_REPLICATION_FACTOR", "KEEL_MIN_INSYNC_REPLICAS",
                 "KEEL_KAFKA_PORT", "KEEL_KAFKA_CONTROLLER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_nodes_take_every_other_port_from_the_configured_ones(tmp_path: Path) -> None:
    layout = plan_cluster(Settings(data_dir=tmp_path, kafka_port=30000, kafka_controller_port=30001), 3)
    assert [(n.node_id, n.port, n.controller_port) for n in layout.nodes] == [
        (1, 30000, 30001), (2, 30002, 30003), (3, 30004, 30005)]
    assert layout.bootstrap == "127.0.0.1:30000,127.0.0.1:30002,127.0.0.1:30004"
    assert (layout.replication_factor, layout.min_insync_replicas, layout.majority) == (3, 2, 2)


def test_overlapping_ports_and_a_one_node_cluster_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InfraError) as caught:
        plan_cluster(Settings(data_dir=tmp_path, kafka_port=30000, kafka_controller_port=30002), 3)
    assert caught.value.code == "cluster_ports"
    with pytest.raises(InfraError) as caught:
        plan_cluster(Settings(data_dir=tmp_path), 1)
    assert caught.value.code == "cluster_size"


@pytest.mark.parametrize(("brokers", "advice"), [(2, "use --brokers 3,"), (4, "use --brokers 3 or 5,")])
def test_an_even_cluster_is_refused_for_its_quorum(tmp_path: Path, brokers: int, advice: str) -> None:
    with pytest.raises(InfraError) as caught:
        plan_cluster(Settings(data_dir=tmp_path), brokers)
    assert caught.value.code == "cluster_size"
    assert f"need {brokers // 2 + 1} of them up to elect a leader" in caught.value.message
    assert advice in caught.value.message
    assert ("replication factor 3" in caught.value.message) is (brokers == 2)
    assert len(plan_cluster(Settings(data_dir=tmp_path), 5).nodes) == 5


def test_keel_up_refuses_two_brokers_before_starting_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KEEL_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["keel", "up", "--brokers", "2"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    assert "[cluster_size] 2 brokers" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("content", "what"), [
    ("{\"host\": \"127.0.0.1\", ", "is not the layout of a local cluster (Invalid JSON"),
    ("[]", "is not the layout of a local cluster (Input should be an object"),
    ("{\"host\": \"127.0.0.1\", \"cluster_id\": \"x\", \"nodes\": []}",
     "is not the layout of a local cluster (nodes: Tuple should have at least 1 item"),
])
def test_a_broken_cluster_file_is_a_clear_error(tmp_path: Path, content: str, what: str) -> None:
    path = layout_path(Settings(data_dir=tmp_path))
    path.parent.mkdir(parents=True)
    path.write_text(content)
    for read in (lambda: Settings(data_dir=tmp_path), lambda: recorded_cluster(Settings.model_construct(
            data_dir=tmp_path))):
        with pytest.raises(InfraError) as caught:
            read()
        assert caught.value.code == "cluster_layout_broken"
        assert caught.value.message.startswith(f"{path} {what}"), caught.value.message
        assert "node-*/broker.pid) and remove it" in caught.value.message


@pytest.mark.parametrize("command", [["status"], ["down"]])
def test_keel_status_and_down_say_the_cluster_file_is_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str],
                                                             command: list[str]) -> None:
    path = tmp_path / "kafka" / "cluster.json"
    path.parent.mkdir()
    path.write_text("{not json")
    monkeypatch.setenv("KEEL_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["keel", *command])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "Traceback" not in err
    assert err.startswith(f"error [cluster_layout_broken] {path} is not the layout of a local cluster"), err


def test_settings_follow_a_recorded_cluster_unless_set_explicitly(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).replication_factor == 1  # no cluster: the single broker's
    layout = plan_cluster(Settings(data_dir=tmp_path), 3, [(40000, 40001), (40010, 40011), (40020, 40021)])
    layout_path(Settings(data_dir=tmp_path)).parent.mkdir(parents=True)
    layout_path(Settings(data_dir=tmp_path)).write_text(json.dumps(layout.document()))

    settings = Settings(data_dir=tmp_path)
    assert settings.bootstrap_servers == "127.0.0.1:40000,127.0.0.1:40010,127.0.0.1:40020"
    assert (settings.replication_factor, settings.min_insync_replicas) == (3, 2)
    assert recorded_cluster(settings) == layout
    explicit = Settings(data_dir=tmp_path, kafka_bootstrap="elsewhere:9092", replication_factor=1)
    assert (explicit.bootstrap_servers, explicit.replication_factor, explicit.min_insync_replicas) == \
        ("elsewhere:9092", 1, 2)


def _node(node_id: int, up: bool, controller: bool = False) -> NodeStatus:
    return NodeStatus(node_id, f"127.0.0.1:{40000 + node_id}", 100 + node_id if up else None, up, controller, 0)


def test_health_reads_worst_first() -> None:
    healthy = ClusterStatus((_node(1, True, True), _node(2, True), _node(3, True)), 2, 3, 1, 54, 0, 0)
    assert healthy.healthy and healthy.detail.startswith("3 of 3 brokers serving; controller: node 1")
    degraded = ClusterStatus((_node(1, True, True), _node(2, True), _node(3, False)), 2, 2, 1, 54, 18, 0)
    assert not degraded.healthy and not degraded.quorum_lost
    assert "18 of 54 partitions under-replicated" in degraded.detail
    lost = ClusterStatus((_node(1, True), _node(2, False), _node(3, False)), 2, 1, None, 54, 0, 0)
    assert lost.quorum_lost and lost.detail.startswith("controller quorum lost: 1 of 3 controllers up, 2 needed")
    down = ClusterStatus((_node(1, False), _node(2, False), _node(3, False)), 2, 0, None, 0, 0, 0)
    assert down.detail == "none of the 3 brokers runs (`keel up` starts them)"
