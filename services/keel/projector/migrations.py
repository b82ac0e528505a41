"""Applies ``projections/<view>/<NNN>_<name>.sql`` to ClickHouse in order, once each.

Keel's own views come first; then each registered domain's ``projections/`` folder, in the
same layout, numbered in its own sequence and recorded in its own table
(``_keel_migrations__<domain>``), so a team never has to pick numbers around Keel's.

Numbers are one sequence across all views (``events/001``, ``tenant_daily/002``, ...), so
a view that reads another view's table simply takes a higher number and the order is
total. Applied files are recorded by number, with a checksum, in ``_keel_migrations``; editing
an applied file is an error (write a new numbered file instead). Each file holds one
statement: ClickHouse's parser (``formatQuery``) checks it before it runs, because chDB
would execute several ``;``-separated statements where a server refuses them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from keel.config import PROJECT_ROOT
from keel.domains.model import Domain
from keel.domains.registry import current
from keel.errors import ConfigError, InfraError

PROJECTIONS_DIR = PROJECT_ROOT / "projections"
MIGRATIONS_TABLE = "_keel_migrations"

_FILE_NAME = re.compile(r"^(?P<number>\d{3,})_[a-z0-9_]+\.sql$")

_CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}
(
    number UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY number
"""


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file of one view."""

    number: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the SQL, to notice an applied file that was edited afterwards."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationReport:
    """What ``apply_migrations`` did: names applied now, names found already applied."""

    applied: tuple[str, ...]
    already_applied: tuple[str, ...]


def discover(root: Path = PROJECTIONS_DIR) -> list[Migration]:
    """Every migration under ``root`` in apply order; refuses misnamed or duplicate numbers."""
    if not root.is_dir():
        raise ConfigError(f"the projections folder {root} does not exist", code="projections_missing")
    found: dict[int, Migration] = {}
    for path in sorted(root.glob("*/*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise ConfigError(f"{path} is not named NNN_lower_snake.sql", code="bad_migration_name")
        number = int(match["number"])
        if number in found:
            raise ConfigError(
                f"{path} reuses number {number:03d} of {found[number].name}; numbers are one "
                "sequence across all views", code="duplicate_migration_number")
        sql = path.read_text().strip().removesuffix(";").strip()
        found[number] = Migration(number=number, name=f"{path.parent.name}/{path.name}", sql=sql)
    return [found[number] for number in sorted(found)]


def apply_migrations(client: Client, root: Path = PROJECTIONS_DIR,
                     domains: Sequence[Domain] | None = None) -> MigrationReport:
    """Apply every migration not yet recorded in the client's database, in order: Keel's
    under ``root``, then each of ``domains``' (default: every registered domain)."""
    report = _apply_set(client, discover(root), MIGRATIONS_TABLE, label="")
    for domain in current().domains if domains is None else domains:
        if domain.projections.is_dir():
            more = _apply_set(client, discover(domain.projections), f"{MIGRATIONS_TABLE}__{domain.name}",
                              label=f"{domain.name}:")
            report = MigrationReport(report.applied + more.applied, report.already_applied + more.already_applied)
    return report


def _apply_set(client: Client, found: list[Migration], table: str, *, label: str) -> MigrationReport:
    migrations = [Migration(m.number, label + m.name, m.sql) for m in found]
    try:
        client.command(_CREATE_TABLE.replace(MIGRATIONS_TABLE, table))
        rows = client.query(f"SELECT number, checksum FROM {table}").result_rows
        recorded = {int(number): str(checksum) for number, checksum in rows}
    except ClickHouseError as exc:
        raise InfraError(f"cannot read the migrations table: {exc}", code="migration_failed") from exc
    applied: list[str] = []
    already: list[str] = []
    for migration in migrations:
        if migration.number in recorded:
            if recorded[migration.number] != migration.checksum:
                raise ConfigError(
                    f"{migration.name} was edited after it was applied; add a new numbered file "
                    "instead", code="migration_changed")
            already.append(migration.name)
            continue
        _apply(client, migration, table)
        applied.append(migration.name)
    return MigrationReport(applied=tuple(applied), already_applied=tuple(already))


def _apply(client: Client, migration: Migration, table: str) -> None:
    try:
        client.query("SELECT formatQuery({sql:String})", parameters={"sql": migration.sql})
    except ClickHouseError as exc:
        raise ConfigError(f"{migration.name} is not one valid statement: {exc}",
                          code="bad_migration") from exc
    try:
        client.command(migration.sql)
        client.insert(table, [[migration.number, migration.name, migration.checksum]],
                      column_names=["number", "name", "checksum"])
    except ClickHouseError as exc:
        raise InfraError(f"applying {migration.name} failed: {exc}", code="migration_failed") from exc
