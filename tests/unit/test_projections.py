"""Pure parts of the projector: migration discovery and order, row mapping, batch tokens."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keel.domain.envelope import Actor, ActorKind, Authority, DelegationLink, Envelope
from support_desk.messages import RefundIssued
from keel.errors import ConfigError
from keel.projector.migrations import PROJECTIONS_DIR, discover
from keel.projector.rows import EVENT_COLUMNS, Position, event_row
from keel.projector.store import Batch, Span


def write(root: Path, relative: str, sql: str = "SELECT 1") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sql)


def test_migrations_run_by_their_number_across_views(tmp_path: Path) -> None:
    write(tmp_path, "zeta/001_create_zeta.sql")
    write(tmp_path, "alpha/003_add_alpha_column.sql")
    write(tmp_path, "alpha/002_create_alpha.sql")
    write(tmp_path, "events/010_add_index.sql")

    names = [m.name for m in discover(tmp_path)]

    assert names == ["zeta/001_create_zeta.sql", "alpha/002_create_alpha.sql",
                     "alpha/003_add_alpha_column.sql", "events/010_add_index.sql"]


def test_a_number_used_twice_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "events/001_create_events.sql")
    write(tmp_path, "daily/001_create_daily.sql")

    with pytest.raises(ConfigError) as refused:
        discover(tmp_path)

    assert refused.value.code == "duplicate_migration_number"


@pytest.mark.parametrize("name", ["1_short.sql", "001-dash.sql", "001_Upper.sql", "create.sql"])
def test_a_misnamed_sql_file_is_refused(tmp_path: Path, name: str) -> None:
    write(tmp_path, f"events/{name}")

    with pytest.raises(ConfigError) as refused:
        discover(tmp_path)

    assert refused.value.code == "bad_migration_name"


def test_trailing_semicolon_and_whitespace_do_not_change_the_checksum(tmp_path: Path) -> None:
    write(tmp_path, "a/001_x.sql", "CREATE TABLE x (a UInt8) ENGINE = Memory")
    write(tmp_path, "b/002_x.sql", "\nCREATE TABLE x (a UInt8) ENGINE = Memory;\n")

    first, second = discover(tmp_path)

    assert first.sql == second.sql and first.checksum == second.checksum


def test_the_shipped_projections_start_with_the_event_log() -> None:
    migrations = discover(PROJECTIONS_DIR)

    assert migrations[0].name == "events/001_create_events.sql"
    for column in EVENT_COLUMNS:
        assert f"    {column} " in migrations[0].sql, column


def test_event_row_carries_attribution_payload_and_position() -> None:
    event = Envelope(
        id=uuid.uuid4(), tenant_id="acme", actor=Actor(kind=ActorKind.AGENT, id="bot"),
        delegation=(DelegationLink(actor=Actor(kind=ActorKind.HUMAN, id="alice"), reason="ticket 7"),),
        on_behalf_of="cust-1", authority=Authority(role="support", approval_id="appr-1"),
        type="RefundIssued", aggregate_id="sub-1", version=3, causation_id=uuid.uuid4(),
        correlation_id=uuid.uuid4(), occurred_at=datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        payload=RefundIssued(amount_cents=500, currency="EUR", reason="late"),
    )

    row = dict(zip(EVENT_COLUMNS, event_row(event, Position("keel.events", 2, 41)), strict=True))

    assert row["event_id"] == event.id and row["version"] == 3 and row["type"] == "RefundIssued"
    assert (row["actor_kind"], row["actor_id"], row["on_behalf_of"]) == ("agent", "bot", "cust-1")
    assert (row["authority_role"], row["authority_approval_id"], row["authority_grant"]) == (
        "support", "appr-1", None)
    assert json.loads(row["delegation"]) == [{"actor": {"kind": "human", "id": "alice"}, "reason": "ticket 7"}]
    assert json.loads(row["payload"]) == {"amount_cents": 500, "currency": "EUR", "reason": "late"}
    assert row["occurred_at"] == event.occurred_at
    assert (row["_topic"], row["_partition"], row["_offset"]) == ("keel.events", 2, 41)


def test_batch_token_names_each_partition_span_and_repeats_for_the_same_records() -> None:
    def build() -> Batch:
        batch = Batch("keel.events")
        for partition, offset in [(2, 10), (0, 5), (2, 11), (0, 6), (0, 9)]:
            batch.add([partition, offset], Position("keel.events", partition, offset))
        return batch

    batch = build()

    assert batch.ordered_spans == [Span(0, 5, 9), Span(2, 10, 11)]
    assert batch.token == "keel.events/0:5-9,2:10-11" == build().token
