"""The ingress commands: ``keel gateway``, ``keel relay``, ``keel tenants`` and ``keel keys``.

``register`` adds them to the main typer app. Tenants and keys live in the outbox
database (``KEEL_OUTBOX_DSN``); with a secure broker, ``keel tenants create`` also makes
the tenant's Kafka principal and ACLs, authenticated as the platform principal.
"""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime
from types import FrameType
from typing import Annotated, Any

import typer
from confluent_kafka.admin import AdminClient
from rich.console import Console

from keel.cli import output
from keel.cli.output import AsJson
from keel.cli.tenancy import require_known
from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind
from keel.errors import ConfigError
from keel.gateway.settings import IngressSettings
from keel.kafka.broker import platform_auth
from keel.kafka.clients import admin_config
from keel.logs import configure_logging
from keel.observability import exporter as metrics
from keel.observability.tracing import configure_tracing
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.security.acl import create_tenant_principal, tenant_prefix, tenant_username
from keel.security.keys import KeyStore
from keel.supervision import collector, readiness

_out = Console()


def register(app: typer.Typer) -> None:
    """Add the ingress commands to ``app``."""
    tenants = typer.Typer(help="Tenants and their Kafka principals.", no_args_is_help=True)
    keys = typer.Typer(help="Per-tenant, per-actor API keys for the gateway.", no_args_is_help=True)
    app.command("gateway")(gateway)
    app.command("relay")(relay)
    tenants.command("create")(tenants_create)
    tenants.command("list")(tenants_list)
    tenants.command("rejections")(tenants_rejections)
    keys.command("create")(keys_create)
    keys.command("list")(keys_list)
    keys.command("revoke")(keys_revoke)
    app.add_typer(tenants, name="tenants")
    app.add_typer(keys, name="keys")


def _stores() -> tuple[OutboxStore, KeyStore]:
    db = open_database(IngressSettings().dsn(Settings()))
    store = OutboxStore(db)
    store.migrate()
    return store, KeyStore(db)


def gateway(host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
            port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
            workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None) -> None:
    """Run the HTTP command gateway (OpenAPI docs at /docs)."""
    from keel.gateway.serve import serve

    ingress = IngressSettings()
    _stores()  # create the tables once, before workers race to
    serve(host or ingress.gateway_host, port or ingress.gateway_port, workers or ingress.gateway_workers)


def relay(track: Annotated[bool, typer.Option(help="Also track command statuses from events and DLQ.")] = True,
          ) -> None:
    """Move outbox rows to Kafka (while holding the relay lease) and track command statuses."""
    from keel.relay.relay import Relay
    from keel.relay.tracker import StatusTracker

    configure_logging(json_lines=True)
    configure_tracing("relay")  # off unless OTEL_* say so
    settings, ingress = Settings(), IngressSettings()
    store, _ = _stores()
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics.start(settings, "relay")
    readiness.install(readiness.Readiness({  # with the broker away, /readyz also tells what waits in the outbox
        "outbox": readiness.outbox(store.db),
        "broker": readiness.broker(settings.bootstrap_servers, readiness.outbox_backlog(store.db))}))
    workers: list[Any] = [Relay(store, settings, ingress)]
    if track:
        workers.append(StatusTracker(store, settings))
    threads = [threading.Thread(target=worker.run, args=(stop,), name=type(worker).__name__) for worker in workers]
    collector.settle()
    for thread in threads:
        thread.start()
    while not stop.is_set():
        stop.wait(0.5)
    for thread in threads:
        thread.join()
    for worker in workers:
        worker.close()


def tenants_create(
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    kafka: Annotated[bool | None, typer.Option(
        help="Create the tenant's Kafka principal and ACLs (default: when the broker is secure).")] = None,
) -> None:
    """Register a tenant; on a secure broker also its SCRAM principal with prefixed ACLs."""
    settings = Settings()
    _, key_store = _stores()
    created = key_store.create_tenant(tenant)
    _out.print(f"tenant {tenant}: {'created' if created else 'exists'}")
    auth = settings.kafka_auth() or platform_auth(settings)
    if kafka is None:
        kafka = bool(auth)
    if not kafka:
        return
    if not auth:
        raise ConfigError("--kafka needs a secure broker: set KEEL_KAFKA_SASL_USERNAME/PASSWORD "
                          "(the platform principal) or run `keel up --secure`", code="kafka_not_secure")
    password = create_tenant_principal(AdminClient({**admin_config(settings), **auth}), settings, tenant)
    _out.print(f"kafka principal User:{tenant_username(tenant)} may use resources prefixed "
               f"{tenant_prefix(settings, tenant)}")
    _out.print(f"password (shown once): {password}", highlight=False, soft_wrap=True)


def tenants_list(as_json: AsJson = False) -> None:
    """List the registered tenants."""
    _, key_store = _stores()
    tenants = key_store.tenants()
    if as_json:
        output.write_json([{"tenant": tenant} for tenant in tenants])
        return
    for tenant in tenants:
        output.say(tenant)
    if not tenants:
        output.say("no tenants registered yet (`keel tenants create`)")


_REJECTION_COLUMNS = (("at", "at"), ("actor", "actor"), ("code", "code"), ("field", "field"),
                      ("claimed_tenant", "claimed tenant"), ("command_id", "command"), ("message", "message"))


def tenants_rejections(tenant: Annotated[str, typer.Argument(help="Tenant id.")], as_json: AsJson = False) -> None:
    """Show the gateway's recorded refusals of a tenant's keys (wrong tenant, wrong actor, replays)."""
    store, _ = _stores()
    records = [{"at": datetime.fromtimestamp(float(str(row["at"])), UTC).isoformat(timespec="seconds"),
                "actor": row["actor"], "code": row["code"], "field": row["field"] or None,
                "claimed_tenant": row["claimed_tenant"] or None, "command_id": row["command_id"] or None,
                "message": row["message"]} for row in store.rejections(tenant)]
    if not records:
        require_known(Settings(), tenant, seen=False)
    output.emit(records, as_json=as_json, empty=f"tenant {tenant} has no rejections",
                shown=output.table(_REJECTION_COLUMNS, records, title=f"rejections of {tenant}"))


def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts in.")],
    actor: Annotated[str, typer.Option(help="kind:id, e.g. agent:support-bot.")],
    role: Annotated[list[str] | None, typer.Option(help="A role; repeat for several.")] = None,
) -> None:
    """Create an API key; its token is printed once and only its hash is kept."""
    kind, _, actor_id = actor.partition(":")
    if kind not in {k.value for k in ActorKind} or not actor_id:
        raise ConfigError(f"--actor must be kind:id with kind one of agent, human, service; got {actor!r}",
                          code="bad_actor", field="actor")
    _, key_store = _stores()
    key, token = key_store.create_key(tenant, Actor(kind=ActorKind(kind), id=actor_id), frozenset(role or ()))
    _out.print(f"key {key.key_id} for {tenant} as {actor}")
    _out.print(f"token (shown once): {token}", highlight=False, soft_wrap=True)


_KEY_COLUMNS = (("key_id", "key"), ("tenant", "tenant"), ("actor", "actor"), ("roles", "roles"),
                ("revoked", "revoked"))


def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
              as_json: AsJson = False) -> None:
    """List API keys (never their secrets)."""
    _, key_store = _stores()
    records = [{"key_id": key.key_id, "tenant": key.tenant_id, "actor": f"{key.actor.kind.value}:{key.actor.id}",
                "roles": sorted(key.roles), "revoked": key.revoked_at is not None} for key in key_store.keys(tenant)]
    if tenant is not None and not records:
        require_known(Settings(), tenant, seen=False)  # keys need a registered tenant: none is a trace
    output.emit(records, as_json=as_json, shown=output.table(_KEY_COLUMNS, records),
                empty=f"tenant {tenant} has no keys yet" if tenant else "no keys yet (`keel keys create`)")


def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (not the token).")]) -> None:
    """Revoke a key; gateways stop accepting it within KEEL_GATEWAY_KEY_CACHE_S seconds."""
    _, key_store = _stores()
    if not key_store.revoke(key_id):
        raise ConfigError(f"no live key {key_id}", code="unknown_key", field="key_id")
    _out.print(f"key {key_id} revoked")
