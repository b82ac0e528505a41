"""The support desk's demo (``keel demo``, ``make demo``): the story Keel exists for, end to end on the local broker and chDB.

For two tenants, a support lead delegates a cancellation to an AI agent. The agent
cancels the subscription, refunds part of the fee, tries to refund more than was paid
(rejected by the domain), proposes a goodwill refund it is unsure of (parked by the
policy until the customer confirms), and queues a follow-up email. The processor decides every
command in Kafka transactions, the projector writes the events to ClickHouse, and the
demo prints the events and a per-tenant query: who did what, on whose behalf.
"""

from __future__ import annotations

import uuid

from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from keel.bootstrap import ensure_local_keys
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, Authority, DelegationLink, Envelope, Payload, new_command
from keel.domain.messages import ApprovalRequested
from keel.domain.personal import is_sealed
from keel.gateway.settings import IngressSettings
from keel.kafka.broker import start_broker
from keel.kafka.clients import admin_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.processor.worker import CommandProcessor
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations
from keel.projector.projector import EventProjector
from keel.query.render import to_table
from keel.query.run import run_query
from keel.sdk.producer import CommandProducer
from keel.security.keys import KeyStore

from support_desk.messages import CancelSubscription, IssueRefund, SendEmail, StartSubscription

TENANT_QUERY = """
SELECT version, type, actor_kind || ':' || actor_id AS actor, on_behalf_of,
       authority_role AS role, JSONExtractString(payload, 'code') AS rejection
FROM events FINAL
WHERE tenant_id = {tenant:String} AND aggregate_id = {aggregate:String}
ORDER BY _partition, _offset
"""
TENANTS = {"acme": ("cust-ada", 4900, "EUR"), "globex": ("cust-bob", 12000, "USD")}


def story(tenant: str, subscription: str) -> list[Envelope]:
    """The commands of one tenant's story, in order."""
    customer, price, currency = TENANTS[tenant]
    billing = Actor(kind=ActorKind.SERVICE, id="billing")
    agent = Actor(kind=ActorKind.AGENT, id="support-bot")
    lead = DelegationLink(actor=Actor(kind=ActorKind.HUMAN, id="jane.lead"),
                          reason="customer asked to cancel and be refunded")
    support_agent = Authority(role="support-agent")
    start = new_command(StartSubscription(customer_id=customer, plan="pro", monthly_price_cents=price,
                                          currency=currency),
                        tenant_id=tenant, aggregate_id=subscription, actor=billing,
                        on_behalf_of=customer, authority=Authority(role="billing-service"))

    def by_agent(payload: Payload) -> Envelope:
        """The agent's command, delegated by the lead, on the customer's behalf."""
        return new_command(payload, tenant_id=tenant, aggregate_id=subscription, actor=agent,
                           on_behalf_of=customer, delegation=(lead,),
                           authority=support_agent, correlation_id=start.id)

    return [
        start,
        by_agent(CancelSubscription(reason="customer request")),
        by_agent(IssueRefund(amount_cents=price // 2, currency=currency, reason="unused half month",
                             confidence=0.93)),
        by_agent(IssueRefund(amount_cents=price * 2, currency=currency, reason="refund everything twice",
                             confidence=0.95)),
        by_agent(IssueRefund(amount_cents=price // 10, currency=currency, reason="goodwill",
                             confidence=0.41)),
        by_agent(SendEmail(to_address=f"{customer}@example.com", template="cancellation-confirmed")),
    ]


def demo() -> None:
    """Start the broker, run the story for two tenants, and show events and projections."""
    console = Console(width=None if Console().is_terminal else 120)
    settings = Settings()
    with console.status("starting the Kafka broker…"):
        console.print(f"[green]broker[/green]: {start_broker(settings).detail}")
    apply_topics(AdminClient(admin_config(settings)), declared_topics(settings))
    ensure_local_keys(settings)  # the customer's e-mail address travels sealed
    _register(settings)

    run = uuid.uuid4().hex[:6]
    subscriptions = {tenant: f"sub-{run}" for tenant in TENANTS}
    with CommandProducer(settings) as producer:
        for tenant, subscription in subscriptions.items():
            for command in story(tenant, subscription):
                producer.send(command)
    console.print(f"submitted {len(TENANTS) * 6} commands for tenants {', '.join(TENANTS)} (run {run})")

    processor = CommandProcessor(settings, instance_id=f"demo-{run}")
    try:
        with console.status("deciding commands in Kafka transactions…"):
            stats = processor.run_until_caught_up(timeout_s=120)
    finally:
        processor.close()
    console.print(f"processor: {stats.commands} commands → {stats.events} events "
                  f"({stats.rejected} rejected, {stats.dead_lettered} dead-lettered); "
                  "the unsure goodwill refund waits for the customer (`keel approvals list --tenant acme`)")

    console.print("delegation on every agent command: human:jane.lead → agent:support-bot "
                  "(customer asked to cancel and be refunded)")
    console.print(_events_table(settings, set(subscriptions.values())))
    _project_and_query(settings, console, aggregate=f"sub-{run}")


def _project_and_query(settings: Settings, console: Console, aggregate: str) -> None:
    """Project the events into ClickHouse and show, per tenant, what an analyst sees."""
    client = connect(settings)
    try:
        apply_migrations(client)
        with console.status(f"projecting events into ClickHouse ({settings.analytics_dsn})…"), \
                EventProjector(settings, client) as projector:
            rows = projector.catch_up()
        console.print(f"projector: {rows} new rows in {settings.clickhouse_database}.events")
        for tenant in TENANTS:
            result = run_query(client, TENANT_QUERY, limit=100, timeout_s=30,
                               parameters={"tenant": tenant, "aggregate": aggregate})
            table = to_table(result)
            table.title = f"ClickHouse: tenant {tenant}, subscription {aggregate}"
            console.print(table)
    finally:
        client.close()


def _register(settings: Settings) -> None:
    """Register the story's tenants, so `keel tenants list` and the `--tenant` checks know them."""
    db = open_database(IngressSettings().dsn(settings))
    try:
        OutboxStore(db).migrate()
        keys = KeyStore(db)
        for tenant in TENANTS:
            keys.create_tenant(tenant)
    finally:
        db.close()


def _detail(event: Envelope) -> str:
    """One readable line for an event's payload: sealed fields labelled, a parked command summarised."""
    if isinstance(event.payload, ApprovalRequested):
        parked = event.payload
        return (f"{parked.command_type} {parked.command_id} waits for {parked.approval_kind.value} "
                f"(rule {parked.policy_rule}) until {parked.expires_at:%Y-%m-%d %H:%M} UTC")
    return ", ".join(f"{k}={'⟨sealed⟩' if is_sealed(v) else v}"
                     for k, v in event.payload.model_dump().items() if v is not None)


def _events_table(settings: Settings, aggregates: set[str]) -> Table:
    codec = EnvelopeCodec()
    table = Table(title="events of this run (read_committed from Kafka)")
    for column in ("tenant", "aggregate", "v", "type", "actor", "on behalf of", "detail"):
        table.add_column(column, overflow="fold")
    events = [codec.decode(m.value() or b"") for m in read_to_end(settings, topic_name(settings, Topic.EVENTS))]
    # Sorting is stable: each aggregate's events keep their log (offset) order.
    for event in sorted((e for e in events if e.aggregate_id in aggregates), key=lambda e: e.tenant_id):
        table.add_row(event.tenant_id, event.aggregate_id, str(event.version or "-"), event.type,
                      f"{event.actor.kind}:{event.actor.id}", event.on_behalf_of or "", _detail(event))
    return table
