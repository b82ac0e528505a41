"""Tenant isolation of analyst queries on chDB: the attack suite, and the queries that must still work.

Every query runs as an analyst of tenant ``acme`` while ``globex`` has rows of its own in the
same tables. An attack either is refused with a code before it reads anything, or runs and
sees nothing but acme's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from clickhouse_connect.driver.client import Client

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind, Envelope, new_command
from support_desk.messages import IssueRefund, SendEmail, StartSubscription
from keel.domain.outcomes import to_events
from keel.domain.aggregate import EMPTY as INITIAL, evolve_aggregate as evolve
from keel.domain.deciding import decide
from keel.errors import QueryError
from keel.projector.clickhouse import connect
from keel.projector.rows import Position, event_row
from keel.projector.store import Batch, insert_batch
from keel.query.run import QueryResult
from keel.query.scope import prepared_scope, scoped_database
from keel.query.service import QueryGate, execute
from tests.plugins.analytics import migrated_database

pytestmark = pytest.mark.integration

SECRET = "globex-secret-plan"


def story(tenant: str, plan: str) -> tuple[list[Envelope], list[Envelope]]:
    """The commands and events of one subscription: started, refunded, emailed."""
    actor = Actor(kind=ActorKind.AGENT, id=f"{tenant}-bot")
    state, commands, events = INITIAL, [], []
    for payload in (StartSubscription(customer_id="c", plan=plan, monthly_price_cents=900, currency="EUR"),
                    IssueRefund(amount_cents=300, currency="EUR", reason="late"),
                    SendEmail(to_address="c@example.com", template="sorry")):
        command = new_command(payload, tenant_id=tenant, aggregate_id="sub-1", actor=actor)
        commands.append(command)
        for event in to_events(command, decide(command, state), version=state.version, now=datetime.now(UTC)):
            state = evolve(state, event)
            events.append(event)
    return commands, events


def insert(client: Client, table: str, envelopes: list[Envelope]) -> None:
    batch = Batch(table)
    for offset, envelope in enumerate(envelopes):
        batch.add(event_row(envelope, Position(table, 0, offset)), Position(table, 0, offset))
    insert_batch(client, batch, table)


@pytest.fixture(scope="module")
def seeded(broker_settings: Settings) -> Iterator[Settings]:
    """Both tenants' commands and events in a database of this module (queries change nothing)."""
    settings = broker_settings.model_copy(update={"clickhouse_database": f"keel_{uuid.uuid4().hex[:10]}"})
    with migrated_database(settings) as client:
        acme_commands, acme_events = story("acme", "pro")
        globex_commands, globex_events = story("globex", SECRET)
        insert(client, "commands", acme_commands + globex_commands)
        insert(client, "events", acme_events + globex_events)
        yield settings


def as_acme(settings: Settings, sql: str, **kwargs: object) -> QueryResult:
    return execute(settings, sql, tenant="acme", limit=1000, timeout_s=10, **kwargs)  # type: ignore[arg-type]


REFUSED = [
    # explicit database prefixes, however spelled
    ("SELECT * FROM {db}.events", "table_not_allowed"),
    ("SELECT * FROM `{db}`.`events`", "table_not_allowed"),
    ('SELECT * FROM "{db}"."events"', "table_not_allowed"),
    ("SELECT * FROM {db}.events FINAL WHERE tenant_id = 'globex'", "table_not_allowed"),
    ("SELECT * FROM {db}.tenant_hourly", "table_not_allowed"),
    # system and information_schema
    ("SELECT name FROM system.tables", "table_not_allowed"),
    ("SELECT name FROM system.databases", "table_not_allowed"),
    ("SELECT * FROM system.one", "table_not_allowed"),
    ("SELECT * FROM INFORMATION_SCHEMA.TABLES", "table_not_allowed"),
    ("SELECT * FROM information_schema.columns", "table_not_allowed"),
    # table functions
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "table_not_allowed"),
    ("SELECT * FROM url('http://127.0.0.1:9/x', 'CSV', 'a String')", "table_not_allowed"),
    ("SELECT * FROM remote('127.0.0.1', system.one)", "table_not_allowed"),
    ("SELECT * FROM numbers(10)", "table_not_allowed"),
    ("SELECT * FROM merge('{db}', '.*')", "table_not_allowed"),
    ("SELECT * FROM generateRandom('a UInt8') LIMIT 1", "table_not_allowed"),
    ("SELECT * FROM view(SELECT * FROM {db}.events)", "table_not_allowed"),
    ("SELECT * FROM s3('http://127.0.0.1:9/b/k', 'CSV')", "table_not_allowed"),
    # SETTINGS overrides, at the top and nested
    ("SELECT * FROM events SETTINGS readonly = 0", "clause_not_allowed"),
    ("SELECT * FROM events SETTINGS max_rows_to_read = 0, max_execution_time = 0", "clause_not_allowed"),
    ("SELECT * FROM (SELECT * FROM events SETTINGS max_execution_time = 1000)", "clause_not_allowed"),
    # UNION, subqueries, CTEs and JOINs reaching out of scope
    ("SELECT tenant_id FROM events UNION ALL SELECT tenant_id FROM {db}.events", "table_not_allowed"),
    ("SELECT tenant_id FROM events UNION DISTINCT SELECT name FROM system.databases", "table_not_allowed"),
    ("SELECT * FROM events WHERE event_id IN (SELECT event_id FROM {db}.events)", "table_not_allowed"),
    ("SELECT (SELECT groupArray(tenant_id) FROM {db}.events)", "table_not_allowed"),
    ("SELECT * FROM events WHERE tenant_id IN {db}.events", "table_not_allowed"),
    ("WITH stolen AS (SELECT * FROM {db}.events) SELECT * FROM stolen", "table_not_allowed"),
    ("SELECT * FROM events AS e JOIN {db}.events AS o ON e.aggregate_id = o.aggregate_id", "table_not_allowed"),
    ("SELECT * FROM events AS e, system.numbers AS n LIMIT 1", "table_not_allowed"),
    # scalar functions that read outside the scope, or stall the engine
    ("SELECT file('/etc/passwd')", "function_not_allowed"),
    ("SELECT joinGet('{db}.events', 'tenant_id', 1)", "function_not_allowed"),
    ("SELECT dictGet('any_dict', 'x', toUInt64(1))", "function_not_allowed"),
    ("SELECT hasColumnInTable('{db}', 'events', 'tenant_id')", "function_not_allowed"),
    ("SELECT sleepEachRow(3) FROM events", "function_not_allowed"),
    # statements that are not one SELECT; comments hiding a second statement
    ("SELECT 1; SELECT * FROM {db}.events", "multi_statement"),
    ("SELECT * FROM events /* harmless */ ; DROP TABLE events", "multi_statement"),
    ("INSERT INTO events SELECT * FROM events", "not_read_only"),
    ("SELECT * FROM events INTO OUTFILE '/tmp/keel-stolen.csv'", "clause_not_allowed"),
    ("SELECT * FROM events FORMAT JSON", "clause_not_allowed"),
    # comment and encoding tricks on the database prefix
    ("SELECT * FROM {db}/* split */.events", "table_not_allowed"),
    ("SELECT * FROM `sys\\x74em`.`one`", "table_not_allowed"),
    ("SELECT * FROM `system.tables`", "table_not_allowed"),
    ("SELECT * FROM {db} . events -- spaced", "table_not_allowed"),
    # tables that exist in the base database but are not exposed to analysts
    ("SELECT * FROM _keel_migrations", "query_failed"),
    ("SELECT * FROM tenant_hourly", "query_failed"),
]


@pytest.mark.parametrize(("sql", "code"), REFUSED)
def test_attack_is_refused_with_a_code(seeded: Settings, sql: str, code: str) -> None:
    with pytest.raises(QueryError) as refused:
        as_acme(seeded, sql.format(db=seeded.clickhouse_database))

    assert refused.value.code == code, refused.value.message
    assert SECRET not in refused.value.message and "globex" not in refused.value.message


CONTAINED = [
    "SELECT DISTINCT tenant_id FROM events",
    "SELECT DISTINCT tenant_id FROM events WHERE tenant_id = 'globex' OR 1 = 1",
    "SELECT DISTINCT tenant_id FROM events WHERE tenant_id != char(103, 108, 111, 98, 101, 120)",
    "SELECT DISTINCT tenant_id FROM commands",
    "SELECT DISTINCT tenant_id FROM command_lifecycle",
    "SELECT DISTINCT tenant_id FROM agent_activity",
    "SELECT DISTINCT tenant_id FROM tenant_metrics",
    "SELECT DISTINCT tenant_id FROM refund_totals",
    "WITH e AS (SELECT * FROM events) SELECT DISTINCT tenant_id FROM e UNION DISTINCT SELECT tenant_id FROM commands",
    "SELECT DISTINCT e.tenant_id FROM events AS e JOIN commands AS c ON e.causation_id = c.event_id",
    "SELECT DISTINCT tenant_id FROM events WHERE event_id IN (SELECT event_id FROM events)",
]


@pytest.mark.parametrize("sql", CONTAINED)
def test_query_naming_another_tenant_sees_only_its_own_rows(seeded: Settings, sql: str) -> None:
    result = as_acme(seeded, sql)

    assert {row[0] for row in result.rows} == {"acme"}


@pytest.mark.parametrize("tenant", ["'globex'", "char(103, 108, 111, 98, 101, 120)", "unhex('676C6F626578')",
                                    "reverse('xebolg')", "{t:String}"])
def test_filtering_on_another_tenant_however_spelled_finds_nothing(seeded: Settings, tenant: str) -> None:
    result = as_acme(seeded, f"SELECT count() FROM events WHERE tenant_id = {tenant}", parameters={"t": "globex"})

    assert result.rows == ((0,),)


def test_other_tenants_payloads_never_show_up(seeded: Settings) -> None:
    result = as_acme(seeded, "SELECT payload FROM events WHERE position(payload, {p:String}) > 0",
                     parameters={"p": SECRET})

    assert result.rows == ()


def test_identifier_parameters_cannot_name_a_table(seeded: Settings) -> None:
    with pytest.raises(QueryError) as refused:
        as_acme(seeded, "SELECT * FROM {t:Identifier}", parameters={"t": f"{seeded.clickhouse_database}.events"})

    assert refused.value.code in {"table_not_allowed", "query_failed"}


def test_well_formed_analyst_queries_answer_for_their_tenant(seeded: Settings) -> None:
    by_type = as_acme(seeded, "SELECT type, count() AS n FROM events GROUP BY type ORDER BY type")
    refunds = as_acme(seeded, "SELECT currency, refunds, refunded_cents FROM refund_totals")
    lifecycle = as_acme(seeded, "SELECT command_type, status FROM command_lifecycle ORDER BY submitted_at")
    joined = as_acme(seeded, "SELECT count() FROM events AS e INNER JOIN commands AS c ON e.causation_id = c.event_id")

    assert by_type.rows == (("EmailQueued", 1), ("RefundIssued", 1), ("SubscriptionStarted", 1))
    assert refunds.rows == (("EUR", 1, 300),)
    assert lifecycle.rows == (("StartSubscription", "executed"), ("IssueRefund", "executed"),
                              ("SendEmail", "executed"))
    assert joined.rows == ((3,),)


def test_ops_see_every_tenant_only_when_they_ask_for_it(seeded: Settings) -> None:
    everyone = execute(seeded, "SELECT DISTINCT tenant_id FROM events ORDER BY tenant_id",
                       tenant=None, limit=10, timeout_s=10)

    assert everyone.rows == (("acme",), ("globex",))
    with pytest.raises(QueryError) as refused:
        execute(seeded, "SELECT * FROM system.tables", tenant=None, limit=10, timeout_s=10)
    assert refused.value.code == "table_not_allowed"


def test_an_invalid_tenant_id_is_refused(seeded: Settings) -> None:
    with pytest.raises(QueryError) as refused:
        execute(seeded, "SELECT 1", tenant="acme' OR '1", limit=1, timeout_s=5)

    assert refused.value.code == "invalid_tenant"


def test_a_full_gate_refuses_instead_of_queueing(seeded: Settings) -> None:
    gate = QueryGate(1)
    with gate.slot(), pytest.raises(QueryError) as refused:
        execute(seeded, "SELECT 1", tenant="acme", limit=1, timeout_s=5, gate=gate)

    assert refused.value.code == "too_many_queries"
    assert execute(seeded, "SELECT 1", tenant="acme", limit=1, timeout_s=5, gate=gate).rows == ((1,),)


def test_a_prepared_scope_is_reused_and_prepared_again_when_its_views_were_dropped(seeded: Settings) -> None:
    key = (seeded.analytics_dsn, seeded.clickhouse_database, "acme")
    as_acme(seeded, "SELECT 1")
    with connect(seeded) as client:
        assert prepared_scope(client, key)[1], "a second query prepared the tenant's scope again"
        client.command(f"DROP DATABASE {scoped_database(seeded.clickhouse_database, 'acme')}")

    again = as_acme(seeded, "SELECT DISTINCT tenant_id FROM events")

    assert again.rows == (("acme",),)
