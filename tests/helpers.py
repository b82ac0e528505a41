"""Builders shared by tests: commands of the reference domain and topic readers."""

from __future__ import annotations

from typing import Any

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, Envelope, Payload, new_command
from support_desk.messages import IssueRefund, StartSubscription
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.sdk.producer import CommandProducer
from keel.security.keys import KeyStore
from keel.trust.keystore_sqlite import SqliteKeyStore

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")


def command(tenant: str, aggregate: str, payload: Payload, actor: Actor = AGENT, **kwargs: object) -> Envelope:
    """A command, from the support agent unless ``actor`` says otherwise, for customer cust-1."""
    kwargs.setdefault("on_behalf_of", "cust-1")
    return new_command(payload, tenant_id=tenant, aggregate_id=aggregate, actor=actor, **kwargs)  # type: ignore[arg-type]


def start(price: int = 5000, currency: str = "EUR") -> StartSubscription:
    return StartSubscription(customer_id="cust-1", plan="pro", monthly_price_cents=price, currency=currency)


def refund(amount: int, currency: str = "EUR") -> IssueRefund:
    return IssueRefund(amount_cents=amount, currency=currency, reason="test")


def events(settings: Settings) -> list[Envelope]:
    """Every committed event, in per-partition log order."""
    codec = EnvelopeCodec()
    return [codec.decode(m.value() or b"") for m in read_to_end(settings, topic_name(settings, Topic.EVENTS))]


def send(settings: Settings, *commands: Envelope) -> None:
    """Send commands through the SDK and wait until Kafka acknowledged every one."""
    with CommandProducer(settings) as producer:
        for cmd in commands:
            producer.send(cmd)


def outbox_with_agent_key(dsn: str) -> str:
    """A new outbox at ``dsn`` with tenant ``acme`` and a key of its agent ``support-bot``; the token."""
    db = open_database(dsn)
    try:
        OutboxStore(db).migrate()
        keys = KeyStore(db)
        keys.create_tenant("acme")
        _, token = keys.create_key("acme", Actor(kind=ActorKind.AGENT, id="support-bot"),
                                   frozenset({"support-agent"}))
        return token
    finally:
        db.close()


class CountingKeyStore(SqliteKeyStore):
    """A SQLite key store that counts the statements it runs."""

    statements = 0

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        self.statements += 1
        return super()._rows(sql, params)
