"""``keel clickhouse provision``: the tenant boundary inside a ClickHouse server, for analysts who connect directly.

The statements come from ``keel.query.provision`` (one user per tenant, readonly, quota, row
policies on every projection, grants on the projections only). ``--print`` writes them to
stdout and touches nothing: no server, no password file. Otherwise they are applied through
clickhouse-connect on ``KEEL_CLICKHOUSE_DSN``, which must name a server (chDB has no users;
there Keel's query guard keeps tenants apart).

The analyst's password lives in a file, never on the command line (shell history, ``ps``)
and never in the output: ``--password-file`` (default ``<data dir>/clickhouse/<user>.password``)
is read if it exists, and must then be private to its owner (no group or other bits); if it
does not exist a random password is generated into it with mode 0600. The server receives
only its SHA-256. Re-running with the same file changes nothing; a new file rotates the password.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlsplit

import typer
from clickhouse_connect.driver.exceptions import ClickHouseError

from keel.cli import output as out
from keel.cli.files import user_file
from keel.config import Settings
from keel.domains.registry import current
from keel.errors import InfraError
from keel.projector.clickhouse import connect
from keel.projector.migrations import PROJECTIONS_DIR, Migration, discover
from keel.query.provision import (Limits, Plan, ProvisionError, analyst_user, password_sha256, projections,
                                  statements)
from keel.query.scope import exposed

_MIN_PASSWORD = 16
_DEFAULTS = Limits()
"""The default limits, shown in ``--help``."""


def register(app: typer.Typer) -> None:
    """Add the ``clickhouse`` group to ``app``."""
    group = typer.Typer(help="A ClickHouse server's own tenant boundary: analyst users, row policies, quotas.",
                        no_args_is_help=True)
    group.command("provision")(provision)
    app.add_typer(group, name="clickhouse")


def provision(
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant whose analyst user to create or update.")],
    print_only: Annotated[bool, typer.Option(
        "--print", "--dry-run", help="Print the DDL (password hash as a placeholder); connect to nothing.")] = False,
    password_file: Annotated[Path | None, typer.Option(
        "--password-file", help="The analyst's password: read if the file exists (mode 0600), else generated "
                                "into it. Default: <data dir>/clickhouse/<user>.password.")] = None,
    service_user: Annotated[str | None, typer.Option(
        "--service-user", help="Keel's own ClickHouse user, which keeps reading every row. Default: the "
                               "DSN's user, else 'default'.")] = None,
    queries_per_hour: Annotated[int, typer.Option(
        min=1, help="Quota: queries per hour.")] = _DEFAULTS.queries_per_hour,
    read_rows_per_hour: Annotated[int, typer.Option(
        min=1, help="Quota: rows read per hour.")] = _DEFAULTS.read_rows_per_hour,
    execution_seconds_per_hour: Annotated[float, typer.Option(
        min=1, help="Quota: seconds of query execution per hour.")] = _DEFAULTS.execution_time_per_hour_s,
) -> None:
    """Create or update TENANT's read-only analyst user on the ClickHouse server, limited to its own rows."""
    settings = Settings()
    dsn = settings.analytics_dsn
    found = projections(projection_migrations())
    plan = Plan(
        tenant=tenant, database=settings.clickhouse_database, projections=found, exposed=frozenset(exposed()),
        service_user=service_user or _dsn_user(dsn),
        limits=Limits(queries_per_hour=queries_per_hour, read_rows_per_hour=read_rows_per_hour,
                      execution_time_per_hour_s=execution_seconds_per_hour))
    user = analyst_user(tenant)
    if print_only:
        printed = "".join(f"{statement};\n" for statement in statements(plan))
        sys.stdout.write(f"-- keel clickhouse provision --tenant {tenant}: printed, not applied\n{printed}")
        return
    if dsn.startswith("chdb:"):
        raise ProvisionError("KEEL_CLICKHOUSE_DSN names the embedded chDB, which has no users or row policies "
                             "(Keel's query guard keeps tenants apart there); point it at a ClickHouse server, "
                             "or use --print", code="clickhouse_server_required")
    path = password_file or settings.data_dir / "clickhouse" / f"{user}.password"
    digest = password_sha256(analyst_password(path))
    applied = statements(replace(plan, password_sha256=digest))
    _apply(settings, applied, digest)
    granted = sum(statement.startswith("GRANT ") for statement in applied)
    out.say(f"provisioned tenant {tenant} on {_server(dsn)}, database {settings.clickhouse_database}: user {user}")
    out.say(f"  password: {path} (mode 0600; the server holds its SHA-256 only)")
    out.say(f"  readonly; row policies on {len(found)} projections ({', '.join(p.name for p in found)}); "
            f"SELECT on {granted} of them; quota per hour: {queries_per_hour} queries, "
            f"{read_rows_per_hour} rows read, {execution_seconds_per_hour:g} s")


def analyst_password(path: Path) -> str:
    """The password in ``path``; a new random one written there (mode 0600) when the file does not exist."""
    with user_file(path, writing=True):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            password = secrets.token_urlsafe(32)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(password + "\n")
            return password
    with user_file(path):
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="utf-8").strip()
    if mode & 0o077:
        raise ProvisionError(f"{path} is open to other users (mode {mode:04o}); `chmod 600` it",
                             code="password_file_exposed")
    if len(text) < _MIN_PASSWORD or any(character.isspace() for character in text):
        raise ProvisionError(f"{path} must hold one password of at least {_MIN_PASSWORD} characters, no spaces",
                             code="weak_password")
    return text


def projection_migrations() -> list[Migration]:
    """Keel's projection migrations, then each registered domain's, as ``apply_migrations`` runs them."""
    found = discover(PROJECTIONS_DIR)
    for domain in current().domains:
        if domain.projections.is_dir():
            found += discover(domain.projections)
    return found


def _apply(settings: Settings, applied: tuple[str, ...], digest: str) -> None:
    client = connect(settings)
    try:
        for statement in applied:
            try:
                client.command(statement)
            except ClickHouseError as exc:
                said = str(exc).replace(digest, "<password hash>")
                raise InfraError(f"{statement.replace(digest, '<password hash>')[:120]}… failed: {said}",
                                 code="provision_failed") from exc
    finally:
        client.close()


def _dsn_user(dsn: str) -> str:
    """The user Keel's services connect as: the DSN's, or clickhouse-connect's default."""
    return unquote(urlsplit(dsn).username or "") or "default"


def _server(dsn: str) -> str:
    """The DSN without its credentials, to name the server in output."""
    parts = urlsplit(dsn)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")

