"""The outbox's tables, in the SQL both engines accept (the dialect fills two words).

``keel_outbox`` holds the command and its idempotency record in one row, so the gateway's
one INSERT is both; ``seq`` orders rows for the relay, ``published_at IS NULL`` marks the
relay's work (a partial index keeps that scan small however long the table grows).
``keel_effects`` holds each effect's folded state (``keel.effects.status``), one row per
effect, found by its origin command or by tenant and state.
"""

from __future__ import annotations

from keel.outbox.db import Cursor, Database
from keel.outbox.models import CommandStatus

PARKED = CommandStatus.PENDING_APPROVAL.value


def ddl(db: Database) -> list[str]:
    """Every CREATE statement (and the DROP of an index replaced), idempotent."""
    return [
        f"""CREATE TABLE IF NOT EXISTS keel_outbox (
            seq {db.serial},
            command_id TEXT NOT NULL UNIQUE,
            tenant_id TEXT NOT NULL,
            aggregate_key TEXT NOT NULL,
            command_type TEXT NOT NULL,
            actor TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            value {db.blob} NOT NULL,
            status TEXT NOT NULL,
            reason_code TEXT,
            reason TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            published_at DOUBLE PRECISION)""",
        "CREATE INDEX IF NOT EXISTS keel_outbox_unsent ON keel_outbox (seq) WHERE published_at IS NULL",
        # Retention prunes by age: a range over this index, never a scan of the whole table.
        "CREATE INDEX IF NOT EXISTS keel_outbox_created ON keel_outbox (created_at)",
        # Approvers list a tenant's parked commands. Only parked rows are in the index, so
        # accepting a command and every other status change leave it alone.
        f"CREATE INDEX IF NOT EXISTS keel_outbox_parked ON keel_outbox (tenant_id) WHERE status = '{PARKED}'",
        "DROP INDEX IF EXISTS keel_outbox_tenant_status",  # what indexed every row for that list before
        _command_events(db, "keel_command_events"),
        "CREATE INDEX IF NOT EXISTS keel_command_events_command ON keel_command_events (command_id)",
        f"""CREATE TABLE IF NOT EXISTS keel_ingress_rejections (
            id {db.serial},
            at DOUBLE PRECISION NOT NULL,
            tenant_id TEXT NOT NULL,
            actor TEXT NOT NULL,
            code TEXT NOT NULL,
            field TEXT,
            message TEXT NOT NULL,
            claimed_tenant TEXT,
            command_id TEXT)""",
        """CREATE TABLE IF NOT EXISTS keel_leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            epoch INTEGER NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS keel_effects (
            effect_id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            origin_command_id TEXT,
            aggregate_id TEXT NOT NULL,
            event_type TEXT,
            provider TEXT,
            generation INTEGER NOT NULL,
            stage INTEGER NOT NULL,
            seq BIGINT NOT NULL,
            state TEXT NOT NULL,
            reason TEXT,
            detail TEXT,
            attempts INTEGER NOT NULL,
            next_attempt_at DOUBLE PRECISION,
            result TEXT,
            error_code TEXT,
            error TEXT,
            event_partition INTEGER,
            event_offset BIGINT,
            updated_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS keel_effects_origin ON keel_effects (origin_command_id)",
        "CREATE INDEX IF NOT EXISTS keel_effects_tenant ON keel_effects (tenant_id, state, updated_at)",
        """CREATE TABLE IF NOT EXISTS keel_tenants (
            tenant_id TEXT PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS keel_api_keys (
            key_id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL REFERENCES keel_tenants (tenant_id),
            actor_kind TEXT NOT NULL,
            actor_id TEXT NOT NULL,
            roles TEXT NOT NULL,
            secret_hash TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION)""",
    ]


def _command_events(db: Database, table: str) -> str:
    """The events each command led to. ``record`` is the event's Avro record as the events topic
    holds it, turned into JSON only when someone reads the command; ``payload`` is the JSON of
    rows written before 2026-12-07 (or of an outcome given with its payload)."""
    return f"""CREATE TABLE IF NOT EXISTS {table} (
            event_id TEXT PRIMARY KEY,
            command_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            occurred_at TEXT NOT NULL,
            payload TEXT,
            record {db.blob})"""


def migrate(db: Database) -> None:
    """Create the outbox's tables where missing and bring older ones up to date (safe to run
    from every process)."""
    with db.transaction() as cursor:
        if db.is_postgres:  # concurrent CREATE IF NOT EXISTS races in PostgreSQL
            cursor.execute("SELECT pg_advisory_xact_lock(7306734)")
        _keep_event_records(db, cursor)
        for statement in ddl(db):
            cursor.execute(statement)


def _keep_event_records(db: Database, cursor: Cursor) -> None:
    """Give a ``keel_command_events`` table from before 2026-12-07 its ``record`` column and a
    nullable ``payload``. SQLite cannot drop a NOT NULL: the table is copied into its new form
    (its index goes with the old table; ``ddl`` creates it again)."""
    if db.is_postgres:
        columns = {row[0] for row in cursor.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = 'keel_command_events'")}
    else:
        columns = {row[1] for row in cursor.query("PRAGMA table_info(keel_command_events)")}
    if not columns or "record" in columns:
        return  # none yet (``ddl`` creates it) or already in its new form: no lock taken
    if db.is_postgres:
        cursor.execute("ALTER TABLE keel_command_events ADD COLUMN record BYTEA")
        cursor.execute("ALTER TABLE keel_command_events ALTER COLUMN payload DROP NOT NULL")
        return
    cursor.execute(_command_events(db, "keel_command_events_new"))
    cursor.execute("INSERT INTO keel_command_events_new (event_id, command_id, event_type, occurred_at, payload) "
                   "SELECT event_id, command_id, event_type, occurred_at, payload FROM keel_command_events")
    cursor.execute("DROP TABLE keel_command_events")
    cursor.execute("ALTER TABLE keel_command_events_new RENAME TO keel_command_events")
