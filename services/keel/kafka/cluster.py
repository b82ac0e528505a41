"""A local KRaft cluster of N nodes on loopback: ``keel up --brokers N``, ``keel status``, ``keel down``.

Every node is a broker and a controller (combined mode) and the N controllers are a static
quorum (``controller.quorum.voters``): the cluster elects leaders while a majority of them
lives. Node i (from 1) listens on ``KEEL_KAFKA_PORT + 2(i-1)`` for clients and on
``KEEL_KAFKA_CONTROLLER_PORT + 2(i-1)`` for the quorum, and keeps its files under
``<data dir>/kafka/node-<i>``, from the same jars and start-up code as the single broker
(``keel.kafka.broker``).

The layout (ports, cluster id, bootstrap, replication) is written to
``<data dir>/kafka/cluster.json`` before the first start: that file is how ``keel status``
and ``keel down`` know the data dir holds a cluster, and ``Settings`` read the bootstrap
addresses and the replication of Keel's topics from it.

The active controller is read from the live nodes' KRaft election state (the
``quorum-state`` file: leader and epoch): under KRaft, Kafka's client APIs (metadata,
DescribeCluster) name a random live broker as "the controller", and librdkafka has no
DescribeQuorum.
"""

from __future__ import annotations

import json
import socket
import string
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata  # type: ignore[attr-defined]

from keel.config import LOCAL_CLUSTER_FILE, Settings, recorded_cluster_file
from keel.errors import InfraError
from keel.kafka.broker import (
    BrokerPaths,
    SilentLogger,
    format_storage,
    jvm_command,
    launch,
    log_tail,
    new_cluster_id,
    paths_for,
    pid_alive,
    read_pid,
    require_free_port,
    require_jars,
    require_java,
    terminate,
)


_HEAP = "512m"
"""Per node: three JVMs share a developer's machine, so each gets half the single broker's heap."""


@dataclass(frozen=True)
class Node:
    """One node of the cluster: its id and ports."""

    node_id: int
    port: int
    controller_port: int


@dataclass(frozen=True)
class ClusterLayout:
    """What ``cluster.json`` records: the nodes, their cluster id, and what clients derive from them."""

    host: str
    cluster_id: str
    nodes: tuple[Node, ...]

    @property
    def bootstrap(self) -> str:
        """Every node's client address, so a client starts while any node serves."""
        return ",".join(f"{self.host}:{node.port}" for node in self.nodes)

    @property
    def replication_factor(self) -> int:
        return min(3, len(self.nodes))

    @property
    def min_insync_replicas(self) -> int:
        """One less than the replication factor: a write survives the loss of one replica."""
        return max(1, self.replication_factor - 1)

    @property
    def majority(self) -> int:
        """Controllers that must live for the quorum to elect a leader."""
        return len(self.nodes) // 2 + 1

    def document(self) -> dict[str, object]:
        """The JSON of ``cluster.json``; its last three keys are the ``Settings`` it implies."""
        return {"host": self.host, "cluster_id": self.cluster_id,
                "nodes": [{"node_id": n.node_id, "port": n.port, "controller_port": n.controller_port}
                          for n in self.nodes],
                "kafka_bootstrap": self.bootstrap, "replication_factor": self.replication_factor,
                "min_insync_replicas": self.min_insync_replicas}


@dataclass(frozen=True)
class NodeStatus:
    """One node as ``keel status`` shows it."""

    node_id: int
    address: str
    pid: int | None
    """The node's live process (from its PID file), if any."""
    serving: bool
    """It accepts clients and the cluster counts it as a live (unfenced) broker."""
    controller: bool
    """It is the active controller (the quorum's leader)."""
    leaders: int
    """Partitions it leads."""


@dataclass(frozen=True)
class ClusterStatus:
    """The cluster's health: its nodes, its quorum and its partitions."""

    nodes: tuple[NodeStatus, ...]
    majority: int
    controllers_up: int
    active_controller: int | None
    partitions: int
    under_replicated: int
    """Partitions whose in-sync replicas are fewer than their replicas."""
    offline: int
    """Partitions without a leader."""

    @property
    def quorum_lost(self) -> bool:
        return self.controllers_up < self.majority

    @property
    def healthy(self) -> bool:
        return (all(node.serving for node in self.nodes) and self.active_controller is not None
                and self.under_replicated == 0 and self.offline == 0)

    @property
    def detail(self) -> str:
        """One line for people; it starts with the worst problem."""
        serving = sum(node.serving for node in self.nodes)
        summary = (f"{serving} of {len(self.nodes)} brokers serving; controller: "
                   f"{'none' if self.active_controller is None else f'node {self.active_controller}'}; "
                   f"{self.under_replicated} of {self.partitions} partitions under-replicated, "
                   f"{self.offline} offline")
        if not any(node.pid for node in self.nodes):
            return f"none of the {len(self.nodes)} brokers runs (`keel up` starts them)"
        if self.quorum_lost:
            return (f"controller quorum lost: {self.controllers_up} of {len(self.nodes)} controllers up, "
                    f"{self.majority} needed; no leader can be elected and no topic changed until a majority "
                    f"is back (`keel up` starts the stopped nodes); {summary} (as last known)")
        return summary


def layout_path(settings: Settings) -> Path:
    return settings.data_dir / LOCAL_CLUSTER_FILE


def node_paths(settings: Settings, node_id: int) -> BrokerPaths:
    """The files of node ``node_id``: the single broker's layout, one folder per node."""
    return BrokerPaths(settings.data_dir / "kafka" / f"node-{node_id}")


def recorded_cluster(settings: Settings) -> ClusterLayout | None:
    """The cluster recorded in the data dir, or ``None`` when it holds (at most) the single broker; a broken
    record is an ``InfraError`` (``cluster_layout_broken``) saying what is wrong and what to do."""
    recorded = recorded_cluster_file(settings.data_dir)
    if recorded is None:
        return None
    return ClusterLayout(recorded.host, recorded.cluster_id,
                         tuple(Node(n.node_id, n.port, n.controller_port) for n in recorded.nodes))


def require_quorum_size(brokers: int) -> None:
    """Refuse a cluster whose size buys nothing: every node is a controller, and the quorum needs a majority.

    An even count survives no more lost nodes than one node fewer (2 survives none, 4 one, as 3 does),
    and on 2 nodes replication factor 3 and ``min.insync.replicas`` 2 cannot hold: one node down
    stops every write. So a local cluster has 3, 5, 7… nodes; 1 is the single broker.
    """
    if brokers >= 3 and brokers % 2 == 1:
        return
    if brokers < 2:
        raise InfraError(f"a cluster has 3, 5, 7… brokers, not {brokers}; `keel up` alone starts the single broker",
                         code="cluster_size")
    survives = (brokers - 1) // 2
    odd = " or ".join(str(n) for n in sorted({max(3, brokers - 1), brokers + 1}))
    raise InfraError(
        f"{brokers} brokers (each also a KRaft controller) need {brokers // 2 + 1} of them up to elect a leader, so "
        f"they survive the loss of {survives} node{'' if survives == 1 else 's'}, no more than {brokers - 1} would"
        + (", and replication factor 3 with min.insync.replicas 2 needs 3 nodes" if brokers == 2 else "")
        + f"; use --brokers {odd}, or leave --brokers out for the single broker", code="cluster_size")


def plan_cluster(settings: Settings, brokers: int,
                 ports: Sequence[tuple[int, int]] | None = None) -> ClusterLayout:
    """A new layout of ``brokers`` nodes: ``ports`` (client, controller) per node, or the defaults from
    ``KEEL_KAFKA_PORT`` and ``KEEL_KAFKA_CONTROLLER_PORT`` in steps of two."""
    require_quorum_size(brokers)
    ports = list(ports) if ports is not None else [
        (settings.kafka_port + 2 * i, settings.kafka_controller_port + 2 * i) for i in range(brokers)]
    if len(ports) != brokers:
        raise InfraError(f"{len(ports)} port pairs for {brokers} brokers", code="cluster_ports")
    every = [port for pair in ports for port in pair]
    if len(set(every)) != len(every):
        raise InfraError(f"the nodes' ports overlap ({every}); set KEEL_KAFKA_PORT and "
                         "KEEL_KAFKA_CONTROLLER_PORT an odd number apart", code="cluster_ports")
    return ClusterLayout(settings.kafka_host, new_cluster_id(),
                         tuple(Node(i + 1, port, controller) for i, (port, controller) in enumerate(ports)))


def start_cluster(settings: Settings, layout: ClusterLayout) -> ClusterStatus:
    """Start each node of ``layout`` that does not run (recording the layout first), and wait until every
    node serves and the quorum has a leader; a second call is a no-op. Nodes that fail to start are stopped
    again."""
    single = read_pid(paths_for(settings).pid_file)
    if single is not None and pid_alive(single):
        raise InfraError(f"the single broker (pid {single}) runs from {settings.data_dir}; `keel down` first",
                         code="broker_mode_conflict")
    down = [node for node in layout.nodes if _pid(settings, node) is None]
    if not down:
        return wait_for_cluster(settings, layout, settings.kafka_start_timeout_s, {})
    java, classpath = require_java(), require_jars(settings.kafka_home)
    for node in down:
        for port in (node.port, node.controller_port):
            require_free_port(layout.host, port)
    layout_path(settings).parent.mkdir(parents=True, exist_ok=True)
    layout_path(settings).write_text(json.dumps(layout.document(), indent=2))
    jvms = {node.node_id: _prepare(settings, layout, node, java, classpath) for node in down}
    unformatted = [node for node in down
                   if not (node_paths(settings, node.node_id).log_dirs / "meta.properties").exists()]
    with ThreadPoolExecutor(max_workers=len(layout.nodes)) as pool:  # one JVM start each: in parallel
        for done in [pool.submit(format_storage, jvms[node.node_id], node_paths(settings, node.node_id),
                                 layout.cluster_id) for node in unformatted]:
            done.result()
    started = {node.node_id: launch(jvms[node.node_id], node_paths(settings, node.node_id)) for node in down}
    try:
        return wait_for_cluster(settings, layout, settings.kafka_start_timeout_s, started)
    except InfraError:
        terminate(*(process.pid for process in started.values()))
        for node_id in started:
            node_paths(settings, node_id).pid_file.unlink(missing_ok=True)
        raise


def wait_for_cluster(settings: Settings, layout: ClusterLayout, timeout_s: float,
                     started: dict[int, subprocess.Popen[bytes]]) -> ClusterStatus:
    """Wait until every node serves and a controller leads; fail with the log of a node that ``started``
    here and exited, or with the status after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        for node_id, process in started.items():
            if process.poll() is not None:
                raise InfraError(f"node {node_id} exited with code {process.returncode} during start-up:\n"
                                 + log_tail(node_paths(settings, node_id)), code="broker_start_failed")
        status = cluster_status(settings, layout)
        if all(node.serving for node in status.nodes) and status.active_controller is not None:
            return status
        if time.monotonic() > deadline:
            lagging = [node.node_id for node in status.nodes if not node.serving] or [layout.nodes[0].node_id]
            raise InfraError(f"the cluster did not serve within {timeout_s:.0f}s ({status.detail}):\n"
                             + log_tail(node_paths(settings, lagging[0])), code="broker_start_timeout")
        time.sleep(0.5)


def stop_cluster(settings: Settings, layout: ClusterLayout) -> list[int]:
    """Stop every node (all at once, SIGKILL after a bound); the PIDs stopped."""
    pids = [pid for node in layout.nodes if (pid := _pid(settings, node)) is not None]
    terminate(*pids)
    for node in layout.nodes:
        node_paths(settings, node.node_id).pid_file.unlink(missing_ok=True)
    return pids


def cluster_status(settings: Settings, layout: ClusterLayout, timeout_s: float = 3.0) -> ClusterStatus:
    """Each node's process, whether it serves, the quorum, and the partitions' replication."""
    pids = {node.node_id: _pid(settings, node) for node in layout.nodes}
    reachable = [node for node in layout.nodes
                 if pids[node.node_id] is not None and _accepts(layout.host, node.port, timeout_s)]
    controllers_up = sum(1 for node in layout.nodes
                         if pids[node.node_id] is not None and _accepts(layout.host, node.controller_port, timeout_s))
    metadata = _metadata(",".join(f"{layout.host}:{node.port}" for node in reachable), timeout_s) if reachable else None
    registered = set(metadata.brokers) if metadata is not None else set()
    partitions = [p for topic in metadata.topics.values() for p in topic.partitions.values()] if metadata else []
    active = _active_controller(settings, [node for node in layout.nodes if pids[node.node_id] is not None])
    if controllers_up < layout.majority:
        active = None  # a minority cannot lead, whatever its last election state says
    nodes = tuple(NodeStatus(node.node_id, f"{layout.host}:{node.port}", pids[node.node_id],
                             serving=node in reachable and node.node_id in registered,
                             controller=node.node_id == active,
                             leaders=sum(1 for p in partitions if p.leader == node.node_id))
                  for node in layout.nodes)
    return ClusterStatus(nodes, layout.majority, controllers_up, active, len(partitions),
                         under_replicated=sum(1 for p in partitions if len(p.isrs) < len(p.replicas)),
                         offline=sum(1 for p in partitions if p.leader < 0))


def _prepare(settings: Settings, layout: ClusterLayout, node: Node, java: str, classpath: str) -> list[str]:
    """Write node ``node``'s configuration; its JVM command line."""
    paths = node_paths(settings, node.node_id)
    paths.logs.mkdir(parents=True, exist_ok=True)
    template = string.Template((settings.kafka_home / "cluster.properties").read_text())
    paths.config.write_text(template.substitute(
        node_id=node.node_id, host=layout.host, port=node.port, controller_port=node.controller_port,
        voters=",".join(f"{n.node_id}@{layout.host}:{n.controller_port}" for n in layout.nodes),
        log_dirs=paths.log_dirs, replication_factor=layout.replication_factor,
        min_insync_replicas=layout.min_insync_replicas))
    return jvm_command(settings, paths, java, classpath, heap=_HEAP)


def _pid(settings: Settings, node: Node) -> int | None:
    pid = read_pid(node_paths(settings, node.node_id).pid_file)
    return pid if pid is not None and pid_alive(pid) else None


def _accepts(host: str, port: int, timeout_s: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _metadata(bootstrap: str, timeout_s: float) -> ClusterMetadata | None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}, logger=SilentLogger())
    try:
        return admin.list_topics(timeout=timeout_s)
    except KafkaException:
        return None


def _active_controller(settings: Settings, live: list[Node]) -> int | None:
    """The leader of the latest election the live nodes know of, if it is one of them."""
    latest: tuple[int, int] | None = None  # (epoch, leader)
    for node in live:
        state = node_paths(settings, node.node_id).log_dirs / "__cluster_metadata-0" / "quorum-state"
        try:
            election = json.loads(state.read_text())
            epoch, leader = int(election["leaderEpoch"]), int(election["leaderId"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if latest is None or epoch > latest[0]:
            latest = (epoch, leader)
    if latest is None or latest[1] not in {node.node_id for node in live}:
        return None
    return latest[1]
