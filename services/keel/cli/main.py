"""The ``keel`` command line: local infrastructure, the pipeline's workers, and the demo.

Every command builds its adapters from ``Settings()`` (``KEEL_*`` variables). A
``KeelError`` is printed as ``[code] message`` and exits 1; nothing prints a traceback
for an error Keel expected.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from keel.domains.registry import current
from keel.cli import analytics, dev, domains, effects, governance, ingress, schemas, trust, watchers, workers
from keel.cli import clickhouse as clickhouse_cli
from keel.cli import mcp as mcp_cli
from keel.cli import replay as replay_cli
from keel.cli import top as top_cli
from keel.bootstrap import ensure_local_keys
from keel.cli.files import read_text
from keel.config import Settings
from keel.errors import InfraError, KeelError, ValidationError
from keel.kafka.broker import broker_status, platform_auth, reset_broker, start_broker, stop_broker
from keel.kafka.cluster import (
    cluster_status,
    layout_path,
    plan_cluster,
    recorded_cluster,
    require_quorum_size,
    start_cluster,
    stop_cluster,
)
from keel.kafka.clients import admin_config
from keel.kafka.topics import apply_topics, declared_topics, topics_admin

app = typer.Typer(help="Keel: governed, audited, replayable actions for AI agents.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
topics_app = typer.Typer(help="Kafka topics declared in code.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
console = Console()
_WITHOUT_DOMAINS = frozenset({"up", "down", "health", "schemas", "top"})
"""Commands that run even while a domain is broken: infrastructure, and the schema tools
that fix it (they load the domains without the schema check)."""


@app.callback()
def _load_domains(ctx: typer.Context) -> None:
    """Load every registered domain before any command runs: all of them, or none and an error."""
    if ctx.invoked_subcommand not in _WITHOUT_DOMAINS:
        current()


@app.command()
def up(timeout: float = typer.Option(None, help="Seconds to wait for the broker(s)."),
       secure: bool = typer.Option(False, help="SASL/SCRAM and ACLs (StandardAuthorizer); needs a fresh data dir; "
                                   "single broker only."),
       brokers: int | None = typer.Option(
           None, min=1, help="Start a local KRaft cluster of N brokers instead: 3, 5, 7… (each also a controller, "
           "so an even N survives no more lost nodes than N-1; 3 gives RF 3 and min.insync.replicas 2); 1 is the "
           "single broker. Node i listens on KEEL_KAFKA_PORT+2(i-1) and "
           "KEEL_KAFKA_CONTROLLER_PORT+2(i-1) and keeps its data in <data dir>/kafka/node-<i>; every client of this "
           "data dir then bootstraps from all nodes. Without it: the single broker, or the cluster the data dir "
           "already holds."),
       ) -> None:
    """Start the local Kafka broker, or cluster (a no-op when it already serves), and apply the topics.

    `keel up --brokers 3`: three brokers, RF 3, min.insync.replicas 2 (docs/operations.md, "A 3-broker cluster")."""
    if brokers is not None and brokers != 1:
        require_quorum_size(brokers)  # before anything starts
    settings = Settings()
    if timeout is not None:
        settings = settings.model_copy(update={"kafka_start_timeout_s": timeout})
    cluster = recorded_cluster(settings)
    if cluster is None and brokers in (None, 1):
        with console.status("starting the Kafka broker…"):
            status = start_broker(settings, secure=secure)
        console.print(f"[green]up[/green]: {status.detail}")
    else:
        if secure:
            raise InfraError("--secure starts the single broker only", code="cluster_not_secure")
        if cluster is not None and brokers not in (None, len(cluster.nodes)):
            raise InfraError(f"{settings.data_dir} holds a {len(cluster.nodes)}-broker cluster; `keel down --wipe` "
                             "deletes it first", code="cluster_size_mismatch")
        layout = cluster or plan_cluster(settings, brokers or 1)
        with console.status(f"starting {len(layout.nodes)} Kafka brokers…"):
            state = start_cluster(settings, layout)
        console.print(f"[green]up[/green]: {state.detail}")
        settings = Settings()  # now reads the recorded layout: bootstrap and replication
        console.print(f"cluster: {layout_path(settings)}; clients bootstrap from {settings.bootstrap_servers}; "
                      f"topics: replication factor {settings.replication_factor}, "
                      f"min.insync.replicas {settings.min_insync_replicas}", soft_wrap=True)
    auth = platform_auth(settings)
    if auth:
        console.print(f"secure: platform principal User:{auth['sasl.username']}; clients set "
                      f"KEEL_KAFKA_SASL_USERNAME/PASSWORD (see {settings.data_dir / 'kafka' / 'credentials.json'})")
    _apply_topics(settings)
    ensure_local_keys(settings)
    console.print(f"keys: personal data is sealed with {settings.data_dir / 'master.key'} "
                  "(set KEEL_MASTER_KEY_FILE in production)")


@app.command()
def down(wipe: bool = typer.Option(False, help="Also delete the broker's (or cluster's) data (all topics).")) -> None:
    """Stop `keel dev`'s services, if it runs, and the local Kafka broker, or every broker of the local cluster,
    started by `keel up` or `keel dev`."""
    from keel.supervision.platform import stop_platform

    settings = Settings()
    for stopped in stop_platform(settings):
        console.print(f"[yellow]down[/yellow]: stopped {stopped}")
    cluster = recorded_cluster(settings)
    if cluster is not None:
        pids = stop_cluster(settings, cluster)
        console.print(f"[yellow]down[/yellow]: stopped {len(pids)} of {len(cluster.nodes)} brokers "
                      f"(pids {', '.join(map(str, pids)) or 'none'})")
    if wipe:
        reset_broker(settings)
        console.print("[yellow]down[/yellow]: broker stopped and its data deleted")
    elif cluster is None:
        console.print(f"[yellow]down[/yellow]: {stop_broker(settings).detail}")


@app.command()
def status() -> None:
    """Report the local broker (or each broker of the local cluster) and, under `keel dev`, each service's health;
    exits 1 when any is not healthy."""
    settings = Settings()
    cluster = recorded_cluster(settings)
    if cluster is None:
        state = broker_status(settings)
        healthy = state.healthy
        colour = "green" if healthy else "red"
        console.print(f"[{colour}]{'healthy' if healthy else 'down'}[/{colour}]: broker: {state.detail}")
    else:
        brokers = cluster_status(settings, cluster)
        healthy = brokers.healthy
        console.print(dev.cluster_table(brokers))
        word = ("healthy" if healthy else "down" if not any(node.pid for node in brokers.nodes)
                else "quorum lost" if brokers.quorum_lost else "degraded")
        colour = "green" if healthy else "red"
        console.print(f"[{colour}]{word}[/{colour}]: cluster: {brokers.detail}", soft_wrap=True)
    services = dev.services_status(settings)
    if services is None:
        console.print("services: keel dev does not run (each runs on its own; `keel health ROLE` checks a worker)")
    raise typer.Exit(0 if healthy and services is not False else 1)


@app.command("config")
def show_config() -> None:
    """Print the effective settings of every part (from KEEL_* variables); secrets stay masked."""
    from keel.bootstrap import trust_settings
    from keel.gateway.settings import IngressSettings
    from keel.watchers.approvals_rules import ApprovalSettings
    from keel.watchers.breaker_rules import BreakerSettings

    settings = Settings()
    sections = {"core": settings, "ingress": IngressSettings(), "trust": trust_settings(settings),
                "breaker_watcher": BreakerSettings(), "approval_watcher": ApprovalSettings()}
    print(json.dumps({name: part.model_dump(mode="json") for name, part in sections.items()}, indent=2))


@topics_app.command("apply")
def topics_apply() -> None:
    """Create or update every declared topic (idempotent)."""
    _apply_topics(Settings())


def _apply_topics(settings: Settings) -> None:
    admin, watch = topics_admin({**admin_config(settings), **platform_auth(settings)})
    outcome = apply_topics(admin, declared_topics(settings), watch=watch)
    for name, action in outcome.items():
        console.print(f"  topic {name}: {action}")


@app.command()
def submit(
    path: str = typer.Argument(..., help="JSON file with one command envelope or a list of them; - for stdin."),
) -> None:
    """Validate commands from JSON and send them to the commands topic (prints their ids)."""
    from keel.contracts.codec import parse_envelope
    from keel.sdk.producer import CommandProducer

    text = sys.stdin.read() if path == "-" else read_text(Path(path))
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        source = "stdin" if path == "-" else path
        raise ValidationError(f"{source} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                              code="malformed_json") from exc
    commands = [parse_envelope(item) for item in (document if isinstance(document, list) else [document])]
    with CommandProducer(Settings()) as producer:
        for command in commands:
            producer.send(command)
    for command in commands:
        console.print(f"sent {command.type} {command.id} ({command.tenant_id}/{command.aggregate_id})")


domains.register(app)
schemas.register(app)
analytics.register(app)
clickhouse_cli.register(app)
replay_cli.register(app)
governance.register(app)
watchers.register(app)
workers.register(app)
dev.register(app)
ingress.register(app)
trust.register(app)
effects.register(app)
mcp_cli.register(app)
top_cli.register(app)


def main() -> None:
    """Entry point: run the app, turning expected errors into one clear line."""
    try:
        app()
    except KeelError as exc:
        Console(stderr=True).print(f"[red]error[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
