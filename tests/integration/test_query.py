"""Analyst queries against embedded ClickHouse (chDB): what runs, what is refused, and why."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind, Envelope, new_command
from support_desk.messages import SendEmail, StartSubscription
from keel.domain.outcomes import to_events
from keel.domain.aggregate import EMPTY as INITIAL, evolve_aggregate as evolve
from keel.domain.deciding import decide
from keel.errors import QueryError
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations
from keel.projector.rows import Position, event_row
from keel.projector.store import Batch, insert_batch
from keel.query.run import run_query

pytestmark = pytest.mark.integration


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    """A client on this test's database holding a few events; the database is dropped afterwards."""
    client = connect(settings)
    apply_migrations(client)
    batch = Batch("events")
    for offset, event in enumerate(events_of("acme", "sub-1") + events_of("globex", "sub-2")):
        batch.add(event_row(event, Position("events", 0, offset)), Position("events", 0, offset))
    insert_batch(client, batch)
    yield client
    client.command(f"DROP DATABASE IF EXISTS {quote_identifier(settings.clickhouse_database)}")
    client.close()


def events_of(tenant: str, aggregate: str) -> list[Envelope]:
    """A started subscription and two queued emails."""
    actor = Actor(kind=ActorKind.AGENT, id="bot")
    state, events = INITIAL, []
    for payload in (StartSubscription(customer_id="c", plan="pro", monthly_price_cents=100, currency="EUR"),
                    SendEmail(to_address="c@example.com", template="welcome"),
                    SendEmail(to_address="c@example.com", template="tips")):
        command = new_command(payload, tenant_id=tenant, aggregate_id=aggregate, actor=actor)
        for event in to_events(command, decide(command, state), version=state.version, now=datetime.now(UTC)):
            state = evolve(state, event)
            events.append(event)
    return events


def test_select_returns_column_names_and_rows(client: Client) -> None:
    result = run_query(client, "SELECT tenant_id, count() AS events FROM events GROUP BY tenant_id "
                               "ORDER BY tenant_id", limit=100, timeout_s=10)

    assert result.columns == ("tenant_id", "events")
    assert result.rows == (("acme", 3), ("globex", 3))
    assert not result.truncated


def test_with_query_is_admitted(client: Client) -> None:
    result = run_query(client, "WITH emails AS (SELECT * FROM events WHERE type = 'EmailQueued') "
                               "SELECT count() FROM emails;", limit=10, timeout_s=10)

    assert result.rows == ((4,),)


def test_rows_beyond_the_limit_are_cut_and_flagged(client: Client) -> None:
    cut = run_query(client, "SELECT arrayJoin(range(50)) AS n ORDER BY n", limit=10, timeout_s=10)
    exact = run_query(client, "SELECT arrayJoin(range(10)) AS n", limit=10, timeout_s=10)

    assert cut.rows == tuple((n,) for n in range(10)) and cut.truncated
    assert len(exact.rows) == 10 and not exact.truncated


def test_empty_result_still_names_its_columns(client: Client) -> None:
    result = run_query(client, "SELECT event_id, type FROM events WHERE tenant_id = 'nobody'",
                       limit=10, timeout_s=10)

    assert result.columns == ("event_id", "type") and result.rows == ()


@pytest.mark.parametrize(("sql", "code"), [
    ("INSERT INTO events (tenant_id) VALUES ('evil')", "not_read_only"),
    ("DROP TABLE events", "not_read_only"),
    ("ALTER TABLE events DELETE WHERE 1", "not_read_only"),
    ("TRUNCATE TABLE events", "not_read_only"),
    ("SHOW TABLES", "not_read_only"),
    ("SELECT 1; DROP TABLE events", "multi_statement"),
    ("DROP TABLE events; SELECT 1", "multi_statement"),
    ("SELECT * FROM events SETTINGS readonly = 0", "clause_not_allowed"),
    ("SELECT 1 FORMAT JSON", "clause_not_allowed"),
    ("SELECT * FROM file('/etc/hostname', 'LineAsString')", "table_not_allowed"),
    ("SELECT tenant_id FROM events WHERE", "syntax_error"),
    ("   ", "empty_query"),
])
def test_anything_but_one_select_is_refused_and_changes_nothing(client: Client, sql: str, code: str) -> None:
    with pytest.raises(QueryError) as refused:
        run_query(client, sql, limit=10, timeout_s=10)

    assert refused.value.code == code
    assert client.query("SELECT count() FROM events").result_rows == [(6,)]
    assert run_query(client, "SELECT 1", limit=1, timeout_s=5).rows == ((1,),)  # the session is still usable


def test_select_into_outfile_is_refused_and_writes_no_file(client: Client, tmp_path: Path) -> None:
    target = tmp_path / "dump.csv"

    with pytest.raises(QueryError) as refused:
        run_query(client, f"SELECT * FROM events INTO OUTFILE '{target}'", limit=10, timeout_s=10)

    assert refused.value.code == "clause_not_allowed"
    assert not target.exists()


def test_query_running_past_its_timeout_is_stopped(client: Client) -> None:
    with pytest.raises(QueryError) as stopped:
        run_query(client, "SELECT count() FROM " + ", ".join(f"events AS e{i}" for i in range(14)),
                  limit=1, timeout_s=0.5)

    assert stopped.value.code == "timeout"


def test_query_reading_more_rows_than_its_budget_is_refused_as_too_expensive(client: Client) -> None:
    with pytest.raises(QueryError) as refused:
        run_query(client, "SELECT sum(length(payload)) FROM events", limit=1, timeout_s=5, max_rows_to_read=2)

    assert refused.value.code == "too_expensive"


def test_unknown_table_is_a_query_failure_with_the_engine_reason(client: Client) -> None:
    with pytest.raises(QueryError) as failed:
        run_query(client, "SELECT * FROM no_such_table", limit=1, timeout_s=5)

    assert failed.value.code == "query_failed" and "no_such_table" in failed.value.message


def test_undefined_function_is_a_query_failure_not_a_crash(client: Client) -> None:
    with pytest.raises(QueryError) as failed:
        run_query(client, "SELECT no_such_function(1)", limit=1, timeout_s=5)

    assert failed.value.code == "query_failed"


def test_parameters_are_bound_server_side_not_spliced(client: Client) -> None:
    sql = "SELECT aggregate_id, count() FROM events WHERE tenant_id = {tenant:String} GROUP BY aggregate_id"

    acme = run_query(client, sql, limit=10, timeout_s=10, parameters={"tenant": "acme"})
    hostile = run_query(client, sql, limit=10, timeout_s=10, parameters={"tenant": "x' OR 1 = 1 --"})

    assert acme.rows == (("sub-1", 3),)
    assert hostile.rows == () and hostile.columns == ("aggregate_id", "count()")
