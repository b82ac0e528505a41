"""The thin path: SDK → processor → events in Kafka → projector → rows in chDB."""

from __future__ import annotations

import json

import pytest

from keel.config import Settings
from support_desk.messages import CancelSubscription, SendEmail
from keel.processor.worker import CommandProcessor
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations
from keel.projector.projector import EventProjector
from keel.query.run import run_query
from keel.sdk.producer import CommandProducer
from tests.helpers import command, events, refund, start

pytestmark = pytest.mark.integration


def test_commands_become_events_in_kafka_and_rows_in_chdb_per_tenant(settings: Settings) -> None:
    with CommandProducer(settings) as producer:
        for tenant in ("acme", "globex"):
            for payload in (start(4000), CancelSubscription(reason="asked"), refund(1000),
                            refund(99_000), SendEmail(to_address="ada@example.com", template="bye")):
                producer.send(command(tenant, "sub-1", payload, on_behalf_of=f"{tenant}-customer"))
    processor = CommandProcessor(settings, instance_id="thin")
    try:
        processor.run_until_caught_up()
    finally:
        processor.close()
    in_kafka = events(settings)

    client = connect(settings)
    try:
        apply_migrations(client)
        with EventProjector(settings, client) as projector:
            assert projector.catch_up() == len(in_kafka) == 10
        for tenant in ("acme", "globex"):
            result = run_query(client, f"SELECT event_id, version, type, on_behalf_of, payload FROM events FINAL "
                                       f"WHERE tenant_id = '{tenant}' ORDER BY _offset", limit=100, timeout_s=30)
            expected = [e for e in in_kafka if e.tenant_id == tenant]
            assert [(row[0], row[1], row[2], row[3]) for row in result.rows] == [
                (e.id, e.version, e.type, e.on_behalf_of) for e in expected]
            assert [json.loads(row[4]) for row in result.rows] == [e.payload.model_dump() for e in expected]
    finally:
        client.close()
