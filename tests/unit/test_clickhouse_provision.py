"""The DDL of ``keel clickhouse provision``: what it enforces, what it refuses, and that printing it touches nothing.

The statements are checked as text; that a ClickHouse server enforces them is the job of
``tests/integration/test_clickhouse_server.py``.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keel.cli import clickhouse as clickhouse_cli
from keel.cli.clickhouse import projection_migrations
from keel.cli.main import app
from keel.errors import KeelError
from keel.projector.migrations import Migration, discover
from keel.query.provision import (PASSWORD_PLACEHOLDER, Kind, Limits, Plan, ProvisionError, Projection,
                                  analyst_user, password_sha256, projections, statements)
from keel.query.scope import exposed

TENANT = "acme"
DIGEST = password_sha256("correct horse battery staple")


def plan(tenant: str = TENANT, **changes: object) -> Plan:
    fields: dict[str, object] = {
        "tenant": tenant, "database": "keel", "projections": projections(projection_migrations()),
        "exposed": frozenset(exposed()), "service_user": "keel", "password_sha256": DIGEST, **changes}
    return Plan(**fields)  # type: ignore[arg-type]


def policies(ddl: tuple[str, ...], to: str) -> dict[str, str]:
    """Table -> USING condition of the row policies granted to ``to``."""
    found = {}
    for statement in ddl:
        match = re.fullmatch(r"CREATE ROW POLICY OR REPLACE `[^`]+` ON `keel`\.`(?P<table>[^`]+)` FOR SELECT "
                             r"USING (?P<condition>.+) AS PERMISSIVE TO (?P<to>`[^`]+`)", statement)
        if match and match["to"] == f"`{to}`":
            found[match["table"]] = match["condition"]
    return found


def grants(ddl: tuple[str, ...], to: str) -> set[str]:
    return {match["target"] for statement in ddl
            if (match := re.fullmatch(rf"GRANT SELECT ON (?P<target>\S+) TO `{re.escape(to)}`", statement))}


def test_every_projection_of_keel_and_the_domains_gets_a_tenant_row_policy() -> None:
    ddl = statements(plan())
    user = analyst_user(TENANT)
    created = {p.name for p in projections(projection_migrations())}

    assert {"events", "commands", "tenant_hourly", "tenant_metrics", "approvals", "refund_totals"} <= created
    assert policies(ddl, user) == {name: "`tenant_id` = 'acme'" for name in created}
    assert policies(ddl, "keel") == {name: "1" for name in created}


def test_a_new_projection_is_policed_without_naming_it_anywhere(tmp_path: Path) -> None:
    (tmp_path / "churn").mkdir()
    (tmp_path / "churn" / "001_create_churn.sql").write_text(
        "-- CREATE TABLE not_this_one (a UInt8)\nCREATE TABLE IF NOT EXISTS churn (tenant_id String) "
        "ENGINE = MergeTree ORDER BY tenant_id")
    (tmp_path / "churn" / "002_create_churn_daily.sql").write_text(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS `churn daily` TO churn AS SELECT tenant_id FROM churn")
    found = projections(projection_migrations() + discover(tmp_path))
    ddl = statements(plan(projections=found))
    user = analyst_user(TENANT)

    assert policies(ddl, user)["churn"] == "`tenant_id` = 'acme'"
    assert policies(ddl, user)["churn daily"] == "`tenant_id` = 'acme'"
    assert "not_this_one" not in policies(ddl, user)
    assert "`keel`.`churn`" in grants(ddl, user)


def test_grants_are_select_on_policed_tables_and_exposed_views_only() -> None:
    ddl = statements(plan())
    user = analyst_user(TENANT)
    granted = grants(ddl, user)
    kinds = {p.name: p.kind for p in projections(projection_migrations())}

    assert granted <= {f"`keel`.`{name}`" for name in policies(ddl, user)}
    assert granted == {f"`keel`.`{name}`" for name, kind in kinds.items()
                       if kind is Kind.TABLE or name in exposed()}
    assert "`keel`.`tenant_hourly_mv`" not in granted and "`keel`.`tenant_hourly_after`" not in granted
    assert not any("_keel_migrations" in statement for statement in ddl)
    everything = [s for s in ddl if s.startswith(("GRANT", "REVOKE")) and " *.* " in s]
    assert everything == [f"REVOKE ALL ON *.* FROM `{user}`"]


def test_policies_come_before_grants_and_the_user_before_both() -> None:
    ddl = statements(plan())
    first_grant = next(i for i, s in enumerate(ddl) if s.startswith("GRANT "))
    last_policy = max(i for i, s in enumerate(ddl) if s.startswith("CREATE ROW POLICY"))

    assert ddl[0].startswith("CREATE USER IF NOT EXISTS")
    assert last_policy < first_grant
    assert ddl[first_grant - 1].startswith("REVOKE ALL ON *.*")


def test_the_analyst_is_readonly_within_keels_query_bounds_and_has_a_quota() -> None:
    limits = Limits(queries_per_hour=7, read_rows_per_hour=1000, execution_time_per_hour_s=60)
    ddl = statements(plan(limits=limits))
    user = f"`{analyst_user(TENANT)}`"
    profile = next(s for s in ddl if s.startswith("CREATE SETTINGS PROFILE"))
    quota = next(s for s in ddl if s.startswith("CREATE QUOTA"))

    assert "readonly = 1 CONST" in profile and profile.endswith(f" TO {user}")
    assert "max_execution_time = 30 CONST" in profile and "max_rows_to_read = 200000000 CONST" in profile
    assert "max_memory_usage = 2147483648 CONST" in profile
    assert quota == (f"CREATE QUOTA OR REPLACE {user} KEYED BY user_name FOR INTERVAL 1 hour "
                     f"MAX queries = 7, read_rows = 1000, execution_time = 60 TO {user}")


@pytest.mark.parametrize("limit", [{"queries_per_hour": 0}, {"read_rows_per_hour": -1},
                                   {"max_execution_time_s": 0.0004}])  # would be written as 0: no limit at all
def test_limits_must_be_positive(limit: dict[str, float]) -> None:
    with pytest.raises(ProvisionError) as refused:
        Limits(**limit)  # type: ignore[arg-type]

    assert refused.value.code == "invalid_limit"


def test_applying_twice_is_applying_once() -> None:
    ddl = statements(plan())

    assert ddl == statements(plan())
    for statement in ddl:
        assert statement.startswith(("CREATE USER IF NOT EXISTS ", "ALTER USER ", "CREATE SETTINGS PROFILE OR REPLACE ",
                                     "CREATE QUOTA OR REPLACE ", "CREATE ROW POLICY OR REPLACE ", "REVOKE ", "GRANT "))
        assert "DROP" not in statement


@pytest.mark.parametrize("tenant", [
    "acme' OR 1=1 --", "acme`; DROP USER keel; --", "acme\\' OR 1 --", "a b", "", "-acme", ".acme", "acme\n",
    "acme;", "x" * 129, "ac/me", "acme\x00", "аcme",  # the last one starts with a Cyrillic a
])
def test_hostile_tenant_ids_are_refused(tenant: str) -> None:
    with pytest.raises(ProvisionError) as refused:
        statements(plan(tenant))

    assert refused.value.code == "invalid_tenant"


@pytest.mark.parametrize("tenant", ["acme.eu:ops@x-1", "A", "7" * 128])
def test_every_valid_tenant_id_becomes_a_literal_and_a_plain_user_name(tenant: str) -> None:
    ddl = statements(plan(tenant))
    user = analyst_user(tenant)

    assert re.fullmatch(r"keel_analyst_[A-Za-z0-9_-]+_[0-9a-f]{12}", user)
    assert set(policies(ddl, user).values()) == {f"`tenant_id` = '{tenant}'"}


def test_tenants_whose_ids_differ_only_in_punctuation_get_different_users() -> None:
    assert analyst_user("acme.eu") != analyst_user("acme_eu") != analyst_user("acme:eu")


def test_names_are_always_quoted_and_escaped() -> None:
    ddl = statements(plan(database="we`ird", service_user="svc`x"))

    assert "ON `we\\`ird`.`events`" in "\n".join(ddl)
    assert "TO `svc\\`x`" in "\n".join(ddl)


@pytest.mark.parametrize(("service_user", "code"), [("", "invalid_name"), (analyst_user("globex"), "invalid_name")])
def test_the_service_user_must_be_named_and_not_an_analyst(service_user: str, code: str) -> None:
    with pytest.raises(ProvisionError) as refused:
        statements(plan(service_user=service_user))

    assert refused.value.code == code


@pytest.mark.parametrize("digest", ["x' OR '1", DIGEST + "\n", DIGEST.upper(), DIGEST[:-1]])
def test_a_password_hash_must_be_a_sha256(digest: str) -> None:
    with pytest.raises(ProvisionError) as refused:
        statements(plan(password_sha256=digest))

    assert refused.value.code == "invalid_password_hash"


def test_a_view_that_runs_as_its_definer_is_refused() -> None:
    definer = Migration(1, "leak/001_create_leak.sql",
                        "CREATE VIEW leak DEFINER = keel SQL SECURITY DEFINER AS SELECT * FROM events")

    with pytest.raises(ProvisionError) as refused:
        projections([definer])

    assert refused.value.code == "unpoliceable_projection"


def test_a_projection_in_another_database_is_refused() -> None:
    with pytest.raises(ProvisionError) as refused:
        projections([Migration(1, "x/001_create_x.sql", "CREATE TABLE other.x (tenant_id String) ENGINE = Log")])

    assert refused.value.code == "unpoliceable_projection"


def test_projections_are_found_once_each_in_migration_order() -> None:
    found = projections([Migration(1, "a/001_a.sql", "CREATE TABLE IF NOT EXISTS a (tenant_id String) ENGINE = Log"),
                         Migration(2, "a/002_a.sql", "ALTER TABLE a ADD COLUMN b UInt8"),
                         Migration(3, "b/003_b.sql", "CREATE OR REPLACE VIEW b AS SELECT * FROM a")])

    assert found == (Projection("a", Kind.TABLE), Projection("b", Kind.VIEW))


def test_printing_connects_to_nothing_and_names_no_credential(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_server(*_: object, **__: object) -> None:
        raise AssertionError("--print connected to ClickHouse")

    monkeypatch.setattr(clickhouse_cli, "connect", no_server)
    env = {"KEEL_DATA_DIR": str(tmp_path), "KEEL_CLICKHOUSE_DSN": "http://keel:s3cret@127.0.0.1:1"}
    done = CliRunner().invoke(app, ["clickhouse", "provision", "--tenant", TENANT, "--print"], env=env)

    assert done.exit_code == 0, done.output
    printed = done.output.splitlines()
    assert printed[0].startswith("-- ") and all(line.endswith(";") for line in printed[1:])
    assert f"'{PASSWORD_PLACEHOLDER}'" in done.output and "s3cret" not in done.output
    assert "TO `keel`;" in done.output  # the DSN's user is the service user
    assert list(tmp_path.iterdir()) == []  # no password file


def test_applying_to_the_embedded_chdb_is_refused_before_anything_happens(tmp_path: Path) -> None:
    env = {"KEEL_DATA_DIR": str(tmp_path), "KEEL_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}"}
    done = CliRunner().invoke(app, ["clickhouse", "provision", "--tenant", TENANT], env=env)

    assert isinstance(done.exception, KeelError) and done.exception.code == "clickhouse_server_required"
    assert list(tmp_path.iterdir()) == []


def test_a_missing_password_file_is_generated_private(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "acme.password"
    password = clickhouse_cli.analyst_password(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(password) >= 32 and path.read_text().strip() == password
    assert clickhouse_cli.analyst_password(path) == password  # the file now decides


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "acme.password"
    path.write_text("a-long-enough-password\n")
    path.chmod(0o644)

    with pytest.raises(ProvisionError) as refused:
        clickhouse_cli.analyst_password(path)

    assert refused.value.code == "password_file_exposed"


def test_a_short_password_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "acme.password"
    path.write_text("short\n")
    path.chmod(0o600)

    with pytest.raises(ProvisionError) as refused:
        clickhouse_cli.analyst_password(path)

    assert refused.value.code == "weak_password"


def test_seconds_are_plain_decimals() -> None:
    ddl = statements(plan(limits=Limits(max_execution_time_s=2.5, execution_time_per_hour_s=1e7)))

    assert "max_execution_time = 2.5 CONST" in "\n".join(ddl) and "execution_time = 10000000 TO" in "\n".join(ddl)
