"""``keel dev``: the broker and every service in one command, supervised, with a live status table.

``keel status`` reports the services ``keel dev`` runs, and ``keel down`` stops them with
the broker (``keel.supervision.platform``). A data dir that holds a local cluster
(``keel up --brokers N``) runs on that cluster.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.live import Live
from rich.table import Table

from keel.bootstrap import ensure_local_keys
from keel.config import Settings
from keel.errors import InfraError
from keel.gateway.settings import IngressSettings
from keel.kafka.broker import broker_status, platform_auth, start_broker, stop_broker
from keel.kafka.cluster import ClusterStatus, cluster_status, recorded_cluster, start_cluster, stop_cluster
from keel.kafka.clients import admin_config
from keel.kafka.topics import apply_topics, declared_topics
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.logs import JsonFormatter
from keel.observability.exporter import published
from keel.supervision.platform import (
    SERVICES,
    PlatformState,
    PlatformSupervisor,
    alive,
    health,
    log_path,
    state_path,
)
from keel.supervision.supervisor import stop_on_signals

_out = Console()


def dev() -> None:
    """Start the broker and every Keel service, restart any that ends, and show their status (Ctrl-C stops all)."""
    settings = Settings()
    running = PlatformState.read(state_path(settings))
    if running is not None and alive(running.supervisor_pid):
        raise InfraError(f"keel dev already runs as pid {running.supervisor_pid}; `keel down` stops it",
                         code="platform_running")
    cluster = recorded_cluster(settings)
    # A broker (or cluster) `keel up` started stays up after keel dev.
    ours = not (broker_status(settings).healthy if cluster is None
                else any(node.serving for node in cluster_status(settings, cluster).nodes))
    with _out.status("starting the Kafka broker…"):
        started = start_broker(settings).detail if cluster is None else start_cluster(settings, cluster).detail
        _out.print(f"broker: {started}", soft_wrap=True)
    apply_topics(AdminClient({**admin_config(settings), **platform_auth(settings)}), declared_topics(settings))
    ensure_local_keys(settings)
    outbox = open_database(IngressSettings().dsn(settings))
    try:
        OutboxStore(outbox).migrate()  # once, before the gateway and the relay race to
    finally:
        outbox.close()
    logs = log_path(settings, "gateway").parent
    logs.mkdir(parents=True, exist_ok=True)
    _log_to(logs / "dev.log")
    ingress = IngressSettings()
    _out.print(f"services log to {logs}/ (restarts: dev.log); the gateway serves "
               f"http://{ingress.gateway_host}:{ingress.gateway_port} (docs at /docs); "
               "Ctrl-C or `keel down` stops everything", soft_wrap=True)
    stop = stop_on_signals()
    with Live(status_table(settings, None), console=_out, auto_refresh=False) as live:
        supervisor = PlatformSupervisor(
            settings, on_change=lambda state: live.update(status_table(settings, state), refresh=True))
        supervisor.run(stop)
    _out.print("[yellow]stopped[/yellow] every service")
    if ours:
        stopped = stop_broker(settings).detail if cluster is None else f"stopped pids {stop_cluster(settings, cluster)}"
        _out.print(f"[yellow]broker[/yellow]: {stopped}", soft_wrap=True)


def _log_to(path: Path) -> None:
    """The supervisor's own log lines (starts, restarts) go to a file: the terminal shows the table."""
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def status_table(settings: Settings, state: PlatformState | None) -> Table:
    """Each service: pid, state, restarts, health and log."""
    table = Table(title=f"keel dev: topics {settings.topic_prefix}.*, data {settings.data_dir}")
    for column in ("service", "pid", "state", "up", "restarts", "health", "metrics"):
        table.add_column(column, overflow="fold")
    metrics = {target.service: target.address.rpartition(":")[2] for target in published(settings)}
    for service in SERVICES:
        current = state.services.get(service.name) if state is not None else None
        if current is None:
            table.add_row(service.name, "", "starting", "", "0", "", "")
            continue
        problem = health(settings, service, current)
        up = f"{time.time() - current.started_at:.0f}s" if current.pid else ""
        table.add_row(service.name, str(current.pid or ""), current.state, up, str(current.restarts),
                      "[green]healthy[/green]" if problem is None else f"[red]{problem}[/red]",
                      f":{metrics[service.name]}" if service.name in metrics else "")
    table.caption = (f"logs: {log_path(settings, 'dev').parent}/<service>.log; metrics: "
                     f"http://127.0.0.1:<port>/metrics (Prometheus: infra/prometheus/prometheus.yml)")
    return table


def cluster_table(state: ClusterStatus) -> Table:
    """Each broker of a local cluster: id, address, pid, whether it serves, its role, the partitions it leads."""
    table = Table(title=f"Kafka cluster: {len(state.nodes)} brokers, quorum needs {state.majority} controllers")
    for column in ("node", "address", "pid", "state", "role", "leads"):
        table.add_column(column)
    for node in state.nodes:
        table.add_row(str(node.node_id), node.address, str(node.pid or ""),
                      "[green]up[/green]" if node.serving else "[red]down[/red]",
                      "active controller" if node.controller else "controller", str(node.leaders))
    table.caption = (f"{state.under_replicated} of {state.partitions} partitions under-replicated "
                     f"(in-sync replicas < replicas), {state.offline} without a leader")
    return table


def services_status(settings: Settings) -> bool | None:
    """Print the services ``keel dev`` runs; whether all are healthy (``None``: keel dev does not run)."""
    state = PlatformState.read(state_path(settings))
    if state is None or not alive(state.supervisor_pid):
        return None
    _out.print(status_table(settings, state))
    uptime = {s.name: time.time() - s.started_at for s in state.services.values() if s.pid}
    _out.print(f"supervised by keel dev (pid {state.supervisor_pid}); longest uptime "
               f"{max(uptime.values(), default=0):.0f}s")
    return all(health(settings, service, state.services[service.name]) is None for service in SERVICES
               if service.name in state.services)


def register(app: typer.Typer) -> None:
    """Add ``keel dev`` to ``app``."""
    app.command("dev")(dev)
