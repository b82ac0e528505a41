"""Blue-green rebuilds on chDB: shadow, atomic swap, rollback, resume, and queries answering throughout."""

from __future__ import annotations

import threading
from typing import cast

import pytest
from clickhouse_connect.driver.client import Client

from keel.config import Settings
from keel.errors import KeelError
from keel.projector.projector import EventProjector
from keel.query.service import execute
from keel.replay.errors import ProjectionError
from keel.replay.rebuild import rebuild, rollback
from tests.integration.test_projector import produce, subscription_story

pytestmark = pytest.mark.integration


def scalar(client: Client, sql: str) -> int:
    return int(client.query(sql).result_rows[0][0])


def test_rebuild_swaps_in_an_identical_table_and_keeps_the_old_for_rollback(
    settings: Settings, migrated: Client
) -> None:
    events = [e for i in range(30) for e in subscription_story(f"t{i % 3}", f"sub-{i}")]
    produce(settings, events)
    with EventProjector(settings, migrated) as projector:
        projector.catch_up()
    migrated.command("ALTER TABLE events DELETE WHERE tenant_id = 't0' SETTINGS mutations_sync = 1")  # drift
    drifted = scalar(migrated, "SELECT count() FROM events")

    report = rebuild(settings, migrated, "events")

    assert report.rows == len(events) == scalar(migrated, "SELECT uniqExact(event_id) FROM events")
    assert scalar(migrated, "SELECT count() FROM events__previous") == drifted < len(events)
    assert [d.table for d in report.dependents] == ["tenant_hourly"]
    assert scalar(migrated, "SELECT sum(events) FROM tenant_metrics") == len(events)
    held = dict(cast(list[tuple[int, int]], migrated.query(
        "SELECT _partition, max(_offset) FROM events__previous GROUP BY _partition").result_rows))
    since = sum(1 for partition, offset in migrated.query("SELECT _partition, _offset FROM events").result_rows
                if offset > held.get(partition, -1))  # past the drifted table's end: kept by a rollback
    rolled_back = rollback(migrated, "events")
    assert rolled_back.rows == drifted + since
    assert [d.table for d in rolled_back.dependents] == ["tenant_hourly"]
    assert scalar(migrated, "SELECT sum(events) FROM tenant_metrics") == drifted + since  # what events holds
    assert rollback(migrated, "events").rows == len(events)  # a second rollback rolls forward
    assert scalar(migrated, "SELECT sum(events) FROM tenant_metrics") == len(events)


def test_interrupted_rebuild_resumes_from_the_shadow_without_duplicates(settings: Settings, migrated: Client) -> None:
    first = [e for i in range(10) for e in subscription_story("acme", f"sub-{i}")]
    produce(settings, first)
    with EventProjector(settings, migrated) as projector:
        projector.catch_up()
    migrated.command("CREATE TABLE events__shadow AS events")
    with EventProjector(settings, migrated, table="events__shadow") as projector:
        projector.catch_up()  # the rebuild got this far before it was interrupted
    second = [e for i in range(10, 20) for e in subscription_story("acme", f"sub-{i}")]
    produce(settings, second)

    report = rebuild(settings, migrated, "events")

    assert report.rows == len(first) + len(second) == scalar(migrated, "SELECT uniqExact(event_id) FROM events")


def test_queries_keep_answering_while_a_rebuild_runs(settings: Settings, migrated: Client) -> None:
    events = [e for i in range(200) for e in subscription_story("acme", f"sub-{i}", emails=5)]
    produce(settings, events)
    with EventProjector(settings, migrated) as projector:
        projector.catch_up()
    answers: list[int] = []
    failures: list[KeelError] = []
    done = threading.Event()

    def ask() -> None:
        while not done.is_set():
            try:
                answers.append(int(execute(settings, "SELECT count() FROM events", tenant="acme", limit=1,
                                           timeout_s=10).rows[0][0]))
            except KeelError as exc:
                failures.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        rebuild(settings, migrated, "events", batch_size=500)
    finally:
        done.set()
        asker.join(30)

    assert not failures and len(answers) >= 2
    assert set(answers) == {len(events)}


@pytest.mark.parametrize(("view", "code"), [("nope", "unknown_view"), ("approvals", "view_not_materialized"),
                                            ("events; DROP TABLE x", "unknown_view")])
def test_rebuilding_what_cannot_be_rebuilt_is_refused_with_a_code(
    settings: Settings, migrated: Client, view: str, code: str
) -> None:
    with pytest.raises(ProjectionError) as refused:
        rebuild(settings, migrated, view)

    assert refused.value.code == code


def test_rollback_without_a_previous_rebuild_is_refused(settings: Settings, migrated: Client) -> None:
    with pytest.raises(ProjectionError) as refused:
        rollback(migrated, "commands")

    assert refused.value.code == "nothing_to_roll_back"
