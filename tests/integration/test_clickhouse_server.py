"""Tenant isolation inside a ClickHouse server, as ``keel clickhouse provision`` sets it up: the attack suite.

Two tenants are provisioned on the server named by ``KEEL_TEST_CLICKHOUSE_URL`` (with a user
that may manage access, e.g. the compose file's ``keel``), both have projected rows, and every
query runs as acme's analyst user, connected directly to the server, with no Keel guard in
between. An attack either is refused by the server, or runs and sees nothing but acme's rows;
the server's own state is checked unchanged afterwards. Mirrors ``test_query_tenancy.py``,
which attacks the embedded path through Keel's guard.

Without the variable the suite is skipped: these machines cannot run a modern ClickHouse server.
"""

from __future__ import annotations

import http.client
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError
from typer.testing import CliRunner

from keel.cli.main import app
from keel.config import Settings
from keel.query.provision import analyst_user, quote
from keel.query.scope import tenant_scope
from keel.query.service import execute
from tests.integration.test_query_tenancy import SECRET, insert, story
from tests.plugins.analytics import migrated_database

URL = os.environ.get("KEEL_TEST_CLICKHOUSE_URL", "")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL, reason=(
        "KEEL_TEST_CLICKHOUSE_URL is not set: this suite needs a modern ClickHouse server (users, row policies, "
        "quotas), which these machines cannot run (Debian ships 18.16, too old for clickhouse-connect; chDB has "
        "no server mode). Start one with `docker compose -f infra/docker-compose.yml up -d clickhouse` and set "
        "KEEL_TEST_CLICKHOUSE_URL=http://keel:keel@127.0.0.1:8123")),
]

SUFFIX = uuid.uuid4().hex[:8]
ACME, GLOBEX, INITECH = f"acme-{SUFFIX}", f"globex-{SUFFIX}", f"initech-{SUFFIX}"
UNKNOWN_FUNCTION, UNKNOWN_TABLE, UNKNOWN_DATABASE, READONLY, CONSTRAINT_VIOLATION, ACCESS_DENIED, QUOTA_EXCEEDED = (
    46, 60, 81, 164, 452, 497, 201)
WRITE_REFUSED = frozenset({READONLY, ACCESS_DENIED})
SETTING_REFUSED = frozenset({READONLY, CONSTRAINT_VIOLATION})
NOT_VISIBLE = frozenset({ACCESS_DENIED, UNKNOWN_TABLE, UNKNOWN_DATABASE, UNKNOWN_FUNCTION, READONLY})
"""A name the user may not read: refused, or reported missing (the server hides what the user may not see)."""


@dataclass(frozen=True)
class Server:
    """The provisioned server: the service's settings and client, and each tenant's password file."""

    settings: Settings
    admin: Client
    passwords: dict[str, Path]

    @property
    def database(self) -> str:
        return self.settings.clickhouse_database

    def password(self, tenant: str) -> str:
        return self.passwords[tenant].read_text().strip()


def provision(settings: Settings, tenant: str, password_file: Path, *options: str) -> None:
    """Run ``keel clickhouse provision`` for ``tenant`` on the suite's server and database."""
    env = {"KEEL_CLICKHOUSE_DSN": URL, "KEEL_CLICKHOUSE_DATABASE": settings.clickhouse_database,
           "KEEL_DATA_DIR": str(settings.data_dir)}
    done = CliRunner().invoke(app, ["clickhouse", "provision", "--tenant", tenant,
                                    "--password-file", str(password_file), *options], env=env)
    assert done.exit_code == 0, f"{done.output}\n{done.exception!r}"


def analyst(server: Server, tenant: str, password: str | None = None) -> Client:
    """A client of ``tenant``'s analyst user, straight onto the server."""
    parts = urlsplit(URL)
    return clickhouse_connect.get_client(
        host=parts.hostname, port=parts.port or 8123, secure=parts.scheme == "https",
        username=analyst_user(tenant), password=password or server.password(tenant), database=server.database,
        autogenerate_session_id=False)


def drop_access(admin: Client, database: str, tenants: tuple[str, ...]) -> None:
    """Remove what provisioning created: the row policies on ``database``, then each tenant's user."""
    rows = admin.query("SELECT short_name, table FROM system.row_policies WHERE database = {db:String}",
                       parameters={"db": database}).result_rows
    for name, table in rows:
        admin.command(f"DROP ROW POLICY IF EXISTS {quote(name)} ON {quote(database)}.{quote(table)}")
    for user in map(analyst_user, tenants):
        for kind in ("QUOTA", "SETTINGS PROFILE", "USER"):
            admin.command(f"DROP {kind} IF EXISTS {quote(user)}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("clickhouse-server")
    settings = Settings(clickhouse_dsn=URL, clickhouse_database=f"keel_{SUFFIX}", data_dir=base / "data")
    passwords = {tenant: base / f"{tenant}.password" for tenant in (ACME, GLOBEX, INITECH)}
    with migrated_database(settings) as admin:
        try:
            for tenant, plan in ((ACME, "pro"), (GLOBEX, SECRET)):
                commands, events = story(tenant, plan)
                insert(admin, "commands", commands)
                insert(admin, "events", events)
            tenant_scope(admin, settings.clickhouse_database, GLOBEX)  # Keel's own scoped views of globex
            provision(settings, ACME, passwords[ACME])
            provision(settings, GLOBEX, passwords[GLOBEX])
            provision(settings, INITECH, passwords[INITECH], "--queries-per-hour", "5")
            yield Server(settings=settings, admin=admin, passwords=passwords)
        finally:
            drop_access(admin, settings.clickhouse_database, (ACME, GLOBEX, INITECH))


@pytest.fixture(scope="module")
def acme(server: Server) -> Iterator[Client]:
    client = analyst(server, ACME)
    yield client
    client.close()


def refused(client: Client, sql: str, codes: frozenset[int] = WRITE_REFUSED) -> None:
    with pytest.raises(DatabaseError) as caught:
        client.command(sql)

    assert caught.value.code in codes, str(caught.value)
    assert SECRET not in str(caught.value) and GLOBEX not in str(caught.value)


def refused_or_contained(client: Client, sql: str) -> None:
    """``sql`` (whose first column is a tenant id) is refused, or sees acme's rows only."""
    try:
        rows = client.query(sql).result_rows
    except DatabaseError as exc:
        assert SECRET not in str(exc)
        return
    assert {row[0] for row in rows} <= {ACME}


def counts(server: Server) -> dict[str, int]:
    """Rows per tenant in the events table, as the service sees them."""
    rows = server.admin.query("SELECT tenant_id, count() FROM events GROUP BY tenant_id").result_rows
    return {str(tenant): int(n) for tenant, n in rows}


CONTAINED = [
    "SELECT DISTINCT tenant_id FROM events",
    "SELECT DISTINCT tenant_id FROM {db}.events FINAL",
    "SELECT DISTINCT tenant_id FROM events WHERE tenant_id = '{globex}' OR 1 = 1",
    "SELECT DISTINCT tenant_id FROM events PREWHERE tenant_id != '{acme}' OR 1 = 1",
    "SELECT DISTINCT tenant_id FROM commands",
    "SELECT DISTINCT tenant_id FROM command_lifecycle",
    "SELECT DISTINCT tenant_id FROM approvals",
    "SELECT DISTINCT tenant_id FROM agent_activity",
    "SELECT DISTINCT tenant_id FROM tenant_metrics",
    "SELECT DISTINCT tenant_id FROM tenant_hourly",
    "SELECT DISTINCT tenant_id FROM refund_totals",
    "SELECT DISTINCT tenant_id FROM events UNION DISTINCT SELECT tenant_id FROM {db}.commands",
    "SELECT DISTINCT e.tenant_id FROM events AS e JOIN commands AS c ON e.causation_id = c.event_id",
    "SELECT arrayJoin((SELECT groupUniqArray(tenant_id) FROM {db}.events))",
    "WITH stolen AS (SELECT * FROM events) SELECT DISTINCT tenant_id FROM stolen",
]


@pytest.mark.parametrize("sql", CONTAINED)
def test_reading_the_projections_sees_only_its_own_rows(server: Server, acme: Client, sql: str) -> None:
    rows = acme.query(sql.format(db=server.database, acme=ACME, globex=GLOBEX)).result_rows

    assert {row[0] for row in rows} <= {ACME}


def test_the_analyst_reads_its_own_rows_through_tables_and_views(acme: Client) -> None:
    by_type = acme.query("SELECT type, count() FROM events FINAL GROUP BY type ORDER BY type").result_rows
    refunds = acme.query("SELECT currency, refunds, refunded_cents FROM refund_totals").result_rows

    assert [tuple(row) for row in by_type] == [("EmailQueued", 1), ("RefundIssued", 1), ("SubscriptionStarted", 1)]
    assert [tuple(row) for row in refunds] == [("EUR", 1, 300)]


def test_other_tenants_payloads_never_show_up(acme: Client) -> None:
    found = acme.query("SELECT count() FROM events WHERE position(payload, {p:String}) > 0",
                       parameters={"p": SECRET}).result_rows

    assert found[0][0] == 0


@pytest.mark.parametrize("sql", [
    "SELECT * FROM tenant_hourly_mv",  # a materialized view: a write path, not granted
    "SELECT * FROM tenant_hourly_after(topic = 'x', partition = 0, after = 0)",  # not exposed to analysts
    "SELECT * FROM _keel_migrations",
    "SELECT * FROM {scope}.events",  # Keel's scoped view of globex
])
def test_objects_outside_the_grants_are_refused(server: Server, acme: Client, sql: str) -> None:
    scope = tenant_scope(server.admin, server.database, GLOBEX).database

    refused(acme, sql.format(scope=quote(scope)), NOT_VISIBLE)


@pytest.mark.parametrize("table", ["query_log", "row_policies", "users", "grants", "settings_profiles", "quotas",
                                   "parts"])
def test_system_tables_that_would_show_other_tenants_are_refused(acme: Client, table: str) -> None:
    refused(acme, f"SELECT * FROM system.{table} LIMIT 1", NOT_VISIBLE)


def test_system_tables_list_only_what_the_analyst_may_read(server: Server, acme: Client) -> None:
    listed = acme.query("SELECT database, name FROM system.tables WHERE database NOT IN "
                        "('system', 'information_schema', 'INFORMATION_SCHEMA')").result_rows

    assert {database for database, _ in listed} <= {server.database}
    assert "_keel_migrations" not in {name for _, name in listed}


@pytest.mark.parametrize("sql", [
    "SELECT * FROM remote('127.0.0.1', {db}.events)",
    "SELECT * FROM url('http://127.0.0.1:9/x', 'CSV', 'a String')",
    "SELECT * FROM file('/etc/passwd', 'LineAsString')",
])
def test_table_functions_that_reach_out_are_refused(server: Server, acme: Client, sql: str) -> None:
    refused(acme, sql.format(db=quote(server.database)))


@pytest.mark.parametrize("sql", [
    "SELECT DISTINCT tenant_id FROM merge('{db}', '^events$')",
    "SELECT DISTINCT tenant_id FROM view(SELECT * FROM {db}.events)",
])
def test_table_functions_over_the_projections_are_refused_or_filtered(server: Server, acme: Client,
                                                                      sql: str) -> None:
    refused_or_contained(acme, sql.format(db=server.database))


@pytest.mark.parametrize("sql", [
    "SELECT tenant_id FROM events SETTINGS readonly = 0",
    "SELECT tenant_id FROM events SETTINGS readonly = 2",
    "SELECT tenant_id FROM events SETTINGS max_rows_to_read = 0, max_execution_time = 0",
    "SELECT tenant_id FROM events SETTINGS profile = 'default'",
    "SET readonly = 0",
    "SET max_memory_usage = 0",
    "SET profile = 'default'",
])
def test_settings_cannot_be_loosened_in_a_query(acme: Client, sql: str) -> None:
    refused(acme, sql, SETTING_REFUSED)


def test_settings_cannot_be_loosened_in_the_http_request(server: Server) -> None:
    parts = urlsplit(URL)
    connection = (http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection)(
        parts.hostname or "127.0.0.1", parts.port or 8123, timeout=30)
    query = urlencode({"query": f"SELECT DISTINCT tenant_id FROM events WHERE tenant_id = '{GLOBEX}'",
                       "database": server.database, "readonly": "0"})
    connection.request("GET", f"/?{query}", headers={"X-ClickHouse-User": analyst_user(ACME),
                                                      "X-ClickHouse-Key": server.password(ACME)})
    answer = connection.getresponse()
    body = answer.read().decode()
    connection.close()

    assert answer.status != 200 and any(f"Code: {code}." in body for code in SETTING_REFUSED), body


@pytest.mark.parametrize("sql", [
    "ALTER USER {me} SETTINGS readonly = 0",
    "ALTER USER {me} SETTINGS PROFILE 'default'",
    "ALTER SETTINGS PROFILE {me} SETTINGS readonly = 0",
    "ALTER QUOTA {me} FOR INTERVAL 1 hour NO LIMITS",
    "DROP QUOTA {me}",
    "CREATE ROW POLICY keel_mine ON {db}.events USING 1 TO {me}",
    "DROP ROW POLICY {me} ON {db}.events",
    "GRANT SELECT ON *.* TO {me}",
])
def test_the_analyst_cannot_change_its_own_access(server: Server, acme: Client, sql: str) -> None:
    refused(acme, sql.format(me=quote(analyst_user(ACME)), db=quote(server.database)))

    assert {row[0] for row in acme.query("SELECT DISTINCT tenant_id FROM events").result_rows} == {ACME}
    refused(acme, "SELECT 1 SETTINGS readonly = 0", SETTING_REFUSED)


@pytest.mark.parametrize("sql", [
    "INSERT INTO events (tenant_id, aggregate_id, event_id, type, schema_version, actor_kind, actor_id, delegation, "
    "correlation_id, occurred_at, payload, _topic, _partition, _offset) VALUES ('{acme}', 'a', generateUUIDv4(), "
    "'Forged', 1, 'agent', 'x', '[]', generateUUIDv4(), now64(6), '{{}}', 't', 0, 0)",
    "INSERT INTO events SELECT * FROM events",
    "INSERT INTO tenant_hourly SELECT * FROM tenant_hourly",
    "DROP TABLE events",
    "DROP DATABASE {db}",
    "TRUNCATE TABLE events",
    "ALTER TABLE events DELETE WHERE 1",
    "ALTER TABLE events UPDATE tenant_id = '{acme}' WHERE 1",
    "DELETE FROM events WHERE 1",
    "RENAME TABLE events TO stolen",
    "OPTIMIZE TABLE events FINAL",
    "CREATE TABLE stolen AS events",
    "CREATE VIEW stolen AS SELECT * FROM events",
])
def test_writes_and_ddl_are_refused(server: Server, acme: Client, sql: str) -> None:
    before = counts(server)

    refused(acme, sql.format(acme=ACME, db=quote(server.database)))

    assert counts(server) == before == {ACME: 3, GLOBEX: 3}


def test_inserting_through_the_client_is_refused(server: Server, acme: Client) -> None:
    with pytest.raises(ClickHouseError):
        acme.insert("tenant_hourly", [[ACME]], column_names=["tenant_id"])

    assert counts(server) == {ACME: 3, GLOBEX: 3}


def test_one_tenants_password_does_not_open_anothers_user(server: Server) -> None:
    with pytest.raises(ClickHouseError):
        analyst(server, ACME, password=server.password(GLOBEX))


def test_exceeding_the_quota_is_refused(server: Server) -> None:
    with pytest.raises(ClickHouseError) as caught:  # connecting runs queries too: they count
        client = analyst(server, INITECH)
        for _ in range(10):
            client.query("SELECT count() FROM events")

    assert "QUOTA_EXCEEDED" in str(caught.value) or getattr(caught.value, "code", None) == QUOTA_EXCEEDED


def test_the_service_and_keels_own_query_path_still_see_what_they_should(server: Server) -> None:
    guarded = execute(server.settings, "SELECT DISTINCT tenant_id FROM events", tenant=ACME, limit=10, timeout_s=10)

    assert counts(server) == {ACME: 3, GLOBEX: 3}
    assert {row[0] for row in guarded.rows} == {ACME}


def access_state(server: Server, tenant: str) -> list[list[tuple[object, ...]]]:
    """What the server holds for ``tenant``'s user, and every row policy of the database, as the service sees it."""
    user = quote(analyst_user(tenant))
    shown = [f"SHOW CREATE {kind} {user}" for kind in ("USER", "SETTINGS PROFILE", "QUOTA")]
    shown.append(f"SHOW GRANTS FOR {user}")
    shown.append("SELECT short_name, table, select_filter, is_restrictive, apply_to_list FROM system.row_policies "
                 f"WHERE database = '{server.database}' ORDER BY short_name, table")
    return [[tuple(row) for row in server.admin.query(sql).result_rows] for sql in shown]


def test_provisioning_again_changes_nothing(server: Server) -> None:
    before = access_state(server, ACME)

    provision(server.settings, ACME, server.passwords[ACME])

    assert access_state(server, ACME) == before
    with analyst(server, ACME) as again:
        assert {row[0] for row in again.query("SELECT DISTINCT tenant_id FROM events").result_rows} == {ACME}
