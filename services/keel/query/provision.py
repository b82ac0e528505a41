"""The tenant boundary inside a ClickHouse server: one analyst user per tenant, as DDL.

On chDB there are no users, so ``keel.query.scope`` and ``keel.query.guard`` build the
boundary in Keel. A ClickHouse server can enforce it itself, for analysts who connect to it
directly; this module writes the statements, ``keel clickhouse provision`` applies them.
Per tenant:

- a user, ``keel_analyst_<tenant>_<digest>``, identified by the SHA-256 of a password the
  server never sees in clear. Everything below is attached to the user itself, not to a
  role: a session can switch its roles off (``SET ROLE NONE``) but never stop being its user;
- a settings profile: ``readonly = 1`` (no writes, no DDL, no setting changes) and the
  per-query bounds of ``keel.query.run``, all ``CONST``;
- a quota per hour: queries, rows read, execution time;
- a row policy ``tenant_id = '<tenant>'`` on every object the projection migrations create
  (Keel's and each domain's), found by reading them, so a new projection is covered the next
  time tenants are provisioned; plus a ``USING 1`` policy for Keel's own service user, which
  must keep reading every row whatever the server's ``users_without_row_policies_can_read_rows``;
- ``SELECT`` on the projection tables and the exposed views, nothing else (so no system
  table that needs a grant, and no table function that reads files, URLs or other servers).
  Views run as the invoker (ClickHouse's default), so the tables under a view must be granted
  too, and the row policies on those tables filter what the view reads. Materialized views
  (write paths) and views not exposed to analysts are not granted.

Policies come before grants, so a half-applied run never leaves a granted table unfiltered.
Every statement is ``IF NOT EXISTS``, ``OR REPLACE``, ``ALTER`` or a revoke-then-grant, so
applying the same plan twice leaves the server as once. Identifiers are quoted and the tenant
travels as a string literal, after the tenant id rule every other part of Keel applies.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from clickhouse_connect.driver.binding import escape_str, format_str

from keel.errors import KeelError
from keel.projector.migrations import Migration
from keel.query.run import MAX_MEMORY_BYTES, MAX_ROWS_TO_READ

# the tenant id rule of keel.query.scope and keel.security.keys, matched whole (a "$" lets "\n" end it)
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_LINE_COMMENT = re.compile(r"--[^\n]*")
_CREATED = re.compile(
    r"\bCREATE\s+(?:OR\s+REPLACE\s+)?(?P<kind>TABLE|MATERIALIZED\s+VIEW|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"(?P<name>`[^`]+`|\"[^\"]+\"|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)",
    re.IGNORECASE)
_DEFINER = re.compile(r"\bSQL\s+SECURITY\s+DEFINER\b", re.IGNORECASE)
USER_PREFIX = "keel_analyst_"
SERVICE_POLICY = "keel_service"
TENANT_COLUMN = "tenant_id"
PASSWORD_PLACEHOLDER = "<sha256 of the analyst password, set when applied>"


class ProvisionError(KeelError):
    """The tenant boundary cannot be written: a bad tenant id or name, or a projection it cannot police."""

    code = "provision_error"


class Kind(StrEnum):
    """What a projection migration creates."""

    TABLE = "table"
    VIEW = "view"
    MATERIALIZED_VIEW = "materialized view"


@dataclass(frozen=True)
class Projection:
    """One object a projection migration creates, in the projections database."""

    name: str
    kind: Kind


@dataclass(frozen=True)
class Limits:
    """What one analyst query may use (``CONST`` settings), and one analyst per hour (quota)."""

    max_execution_time_s: float = 30.0
    max_rows_to_read: int = MAX_ROWS_TO_READ
    max_memory_usage: int = MAX_MEMORY_BYTES
    queries_per_hour: int = 1000
    read_rows_per_hour: int = 50 * MAX_ROWS_TO_READ
    execution_time_per_hour_s: float = 1800.0

    def __post_init__(self) -> None:
        # to ClickHouse 0 means no limit; times are written to the millisecond, so 1 ms is the least
        for name, value in vars(self).items():
            if value < (0.001 if name.endswith("_s") else 1):
                raise ProvisionError(f"the limit {name} must be positive, got {value}", code="invalid_limit")


@dataclass(frozen=True)
class Plan:
    """Everything that decides the statements of one tenant's analyst user.

    ``exposed`` names the views analysts may query (``keel.query.scope.exposed``);
    ``service_user`` is the ClickHouse user Keel's services connect as. ``password_sha256``
    is the hex SHA-256 of the analyst's password, or None to print the plan with a
    placeholder (the printed DDL then holds no credential material at all).
    """

    tenant: str
    database: str
    projections: tuple[Projection, ...]
    exposed: frozenset[str]
    service_user: str
    limits: Limits = Limits()
    password_sha256: str | None = None


def validate_tenant(tenant: str) -> None:
    """Refuse ``tenant`` unless it is a valid Keel tenant id: it ends up in names and in a literal."""
    if not _TENANT.fullmatch(tenant):
        raise ProvisionError(f"{tenant!r} is not a valid tenant id: 1 to 128 characters, letters, digits "
                             "and . _ : @ -, starting with a letter or digit", code="invalid_tenant",
                             field="tenant")


def analyst_user(tenant: str) -> str:
    """The name of ``tenant``'s analyst user (also its profile's, quota's and row policies').

    Readable, and safe in an HTTP Basic header (no ``:``): characters outside ``[A-Za-z0-9_-]``
    become ``_``, and a digest of the tenant id keeps two tenants from sharing a name.
    """
    validate_tenant(tenant)
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:12]
    return f"{USER_PREFIX}{_UNSAFE_IN_NAME.sub('_', tenant)}_{digest}"


def password_sha256(password: str) -> str:
    """What the server stores for ``password`` (``IDENTIFIED WITH sha256_hash``)."""
    return hashlib.sha256(password.encode()).hexdigest()


def projections(migrations: Iterable[Migration]) -> tuple[Projection, ...]:
    """Every table, view and materialized view ``migrations`` create, in order, each once.

    A migration that names a database, or a view that runs as its definer (so the row
    policies of the tables under it would not be the analyst's), is refused: its objects
    could not be policed.
    """
    found: dict[str, Projection] = {}
    for migration in migrations:
        sql = _LINE_COMMENT.sub("", migration.sql)
        for match in _CREATED.finditer(sql):
            kind = Kind(" ".join(match["kind"].lower().split()))
            name = match["name"]
            if name[0] in "`\"":
                name = name[1:-1]
            elif "." in name:
                raise ProvisionError(f"{migration.name} creates {name} in a named database; projections "
                                     "live in the projections database", code="unpoliceable_projection")
            if kind is not Kind.TABLE and _DEFINER.search(sql):
                raise ProvisionError(f"{migration.name}: the view {name} runs as its definer, so row policies "
                                     "would filter it for the definer, not the analyst",
                                     code="unpoliceable_projection")
            found.setdefault(name, Projection(name=name, kind=kind))
    if not found:
        raise ProvisionError("the projection migrations create no table or view", code="projections_missing")
    return tuple(found.values())


def statements(plan: Plan) -> tuple[str, ...]:
    """The DDL that gives ``plan.tenant``'s analyst its read-only, tenant-filtered view of the projections.

    Order matters: the user, its profile and quota, the row policies, then the grants.
    """
    validate_tenant(plan.tenant)
    if not plan.service_user:
        raise ProvisionError("the service user's name is empty", code="invalid_name", field="service_user")
    if plan.service_user.startswith(USER_PREFIX):
        raise ProvisionError(f"{plan.service_user} is a tenant analyst, not Keel's service user",
                             code="invalid_name", field="service_user")
    if plan.password_sha256 is not None and not _SHA256_HEX.fullmatch(plan.password_sha256):
        raise ProvisionError("the password hash is not a hex SHA-256", code="invalid_password_hash")
    name = analyst_user(plan.tenant)
    user, service, limits = quote(name), quote(plan.service_user), plan.limits
    identified = ("IDENTIFIED WITH sha256_hash BY "
                  f"{format_str(plan.password_sha256 or PASSWORD_PLACEHOLDER)} DEFAULT DATABASE {quote(plan.database)}")
    policed = [f"{quote(plan.database)}.{quote(p.name)}" for p in plan.projections]
    granted = [f"{quote(plan.database)}.{quote(p.name)}" for p in plan.projections
               if p.kind is Kind.TABLE or (p.kind is Kind.VIEW and p.name in plan.exposed)]
    return (
        f"CREATE USER IF NOT EXISTS {user} {identified}",
        f"ALTER USER {user} {identified}",
        f"CREATE SETTINGS PROFILE OR REPLACE {user} SETTINGS readonly = 1 CONST, "
        f"max_execution_time = {_seconds(limits.max_execution_time_s)} CONST, "
        f"max_rows_to_read = {limits.max_rows_to_read} CONST, "
        f"max_memory_usage = {limits.max_memory_usage} CONST TO {user}",
        f"CREATE QUOTA OR REPLACE {user} KEYED BY user_name FOR INTERVAL 1 hour "
        f"MAX queries = {limits.queries_per_hour}, read_rows = {limits.read_rows_per_hour}, "
        f"execution_time = {_seconds(limits.execution_time_per_hour_s)} TO {user}",
        *(f"CREATE ROW POLICY OR REPLACE {quote(SERVICE_POLICY)} ON {target} FOR SELECT USING 1 "
          f"AS PERMISSIVE TO {service}" for target in policed),
        *(f"CREATE ROW POLICY OR REPLACE {user} ON {target} FOR SELECT "
          f"USING {quote(TENANT_COLUMN)} = {format_str(plan.tenant)} AS PERMISSIVE TO {user}"
          for target in policed),
        f"REVOKE ALL ON *.* FROM {user}",
        *(f"GRANT SELECT ON {target} TO {user}" for target in granted),
    )


def _seconds(value: float) -> str:
    """A number of seconds as a plain decimal literal (never ``1e+06``), to the millisecond."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def quote(identifier: str) -> str:
    """``identifier`` in backquotes, escaped: always quoted, whatever it already looks like."""
    return f"`{escape_str(identifier)}`"
