"""The stats watcher's counting rules, changelog folding and rendering, without Kafka."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from keel.cli.watchers import render
from keel.domain.envelope import Actor, ActorKind, Envelope, new_command
from support_desk.messages import CancelSubscription, EmailQueued, StartSubscription
from keel.domain.outcomes import to_events
from keel.domain.aggregate import EMPTY as INITIAL
from keel.domain.deciding import decide
from keel.errors import DecodeError
from keel.watchers.stats_reader import Windows, fold_record
from keel.watchers.stats_tally import (
    Counts,
    Metric,
    Source,
    classify,
    classify_event,
    minutes_since,
    summarise,
    table_key,
    tenant_of,
    totals_by_tenant,
)

NOW = datetime(2026, 3, 1, 12, 30, 45, tzinfo=UTC)
ACTOR = Actor(kind=ActorKind.AGENT, id="support-bot")


def _command(payload: StartSubscription | CancelSubscription, tenant: str = "acme") -> Envelope:
    return new_command(payload, tenant_id=tenant, aggregate_id="sub-1", actor=ACTOR)


def _start() -> StartSubscription:
    return StartSubscription(customer_id="c-1", plan="pro", monthly_price_cents=900, currency="EUR")


def test_first_event_of_an_accepted_command_counts_as_accepted() -> None:
    command = _command(_start())
    [event] = to_events(command, decide(command, INITIAL), version=0, now=NOW)
    assert classify_event(event) is Metric.ACCEPTED


def test_rejection_counts_as_rejected() -> None:
    command = _command(CancelSubscription(reason="customer asked"))
    [event] = to_events(command, decide(command, INITIAL), version=0, now=NOW)
    assert event.type == "CommandRejected"
    assert classify_event(event) is Metric.REJECTED


def test_later_events_of_a_command_are_not_decisions() -> None:
    command = _command(_start())
    payloads = [*decide(command, INITIAL), EmailQueued(to_address="a@b.c", template="welcome")]
    first, second = to_events(command, payloads, version=0, now=NOW)
    assert classify_event(first) is Metric.ACCEPTED
    assert classify_event(second) is None


def test_event_without_causation_is_not_a_decision() -> None:
    command = _command(_start())
    [event] = to_events(command, decide(command, INITIAL), version=0, now=NOW)
    assert classify_event(event.model_copy(update={"causation_id": None})) is None


def test_anything_on_the_commands_topic_counts_as_a_command() -> None:
    assert classify(Source.COMMANDS, _command(_start())) is Metric.COMMANDS


def test_counts_add_one_metric_and_remember_the_offset() -> None:
    counts = Counts().add(Metric.ACCEPTED, 7)
    assert counts == Counts(accepted=1, offset=7)
    assert counts.add(Metric.REJECTED, 8) == Counts(accepted=1, rejected=1, offset=8)


def test_a_redelivered_offset_is_not_counted_twice() -> None:
    counts = Counts().add(Metric.COMMANDS, 3)
    assert counts is not None
    assert counts.add(Metric.COMMANDS, 3) is None
    assert counts.add(Metric.COMMANDS, 2) is None


def test_counts_round_trip_through_json_and_ignore_unknown_fields() -> None:
    counts = Counts(commands=2, accepted=1, rejected=1, undecodable=3, offset=9)
    assert Counts.from_json(json.loads(json.dumps(counts.to_json()))) == counts
    assert Counts.from_json({"commands": 1, "later_field": 5}) == Counts(commands=1)
    assert Counts.from_json(None) == Counts()
    assert Counts.from_json({}) == Counts()


def test_table_keys_carry_tenant_source_and_partition() -> None:
    key = table_key("acme", Source.EVENTS, 2)
    assert key == "acme/events/2"
    assert tenant_of(key) == "acme"


def test_summarise_sums_partitions_and_sources_per_minute_and_tenant() -> None:
    minute = NOW.replace(second=0).timestamp()
    windows = {
        (table_key("acme", Source.COMMANDS, 0), minute): Counts(commands=2, offset=5),
        (table_key("acme", Source.COMMANDS, 1), minute): Counts(commands=1, offset=1),
        (table_key("acme", Source.EVENTS, 0), minute): Counts(accepted=2, rejected=1, offset=9),
        (table_key("globex", Source.COMMANDS, 0), minute): Counts(commands=4, offset=6),
        (table_key("acme", Source.COMMANDS, 0), minute - 60): Counts(commands=7, offset=1),
    }
    rows = summarise(windows)
    assert [(row.minute.timestamp(), row.tenant) for row in rows] == [
        (minute - 60, "acme"), (minute, "acme"), (minute, "globex")]
    assert rows[1].counts.commands == 3 and rows[1].counts.accepted == 2
    assert rows[1].counts.rejected == 1
    totals = totals_by_tenant(rows)
    assert totals["acme"].commands == 10 and totals["globex"].commands == 4


def test_summarise_filters_by_tenant_and_age() -> None:
    minute = NOW.replace(second=0).timestamp()
    windows = {
        (table_key("acme", Source.COMMANDS, 0), minute): Counts(commands=1),
        (table_key("acme", Source.COMMANDS, 0), minute - 120): Counts(commands=1),
        (table_key("globex", Source.COMMANDS, 0), minute): Counts(commands=1),
    }
    rows = summarise(windows, tenant="acme", since=minutes_since(2, NOW))
    assert [(row.minute.timestamp(), row.tenant) for row in rows] == [(minute, "acme")]


def test_minutes_since_includes_the_current_minute() -> None:
    assert minutes_since(1, NOW) == datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    assert minutes_since(15, NOW) == datetime(2026, 3, 1, 12, 16, tzinfo=UTC)


def _record(key: str, start: float, value: dict[str, int] | None) -> tuple[bytes, bytes | None]:
    raw_value = None if value is None else json.dumps(value).encode()
    return json.dumps([key, [start, start + 59.9]]).encode(), raw_value


def test_changelog_latest_record_wins_and_a_tombstone_deletes() -> None:
    windows: Windows = {}
    fold_record(windows, *_record("acme/commands/0", 60.0, {"commands": 1, "offset": 0}))
    fold_record(windows, *_record("acme/commands/0", 60.0, {"commands": 2, "offset": 1}))
    fold_record(windows, *_record("acme/commands/0", 120.0, {"commands": 1, "offset": 2}))
    assert windows == {("acme/commands/0", 60.0): Counts(commands=2, offset=1),
                       ("acme/commands/0", 120.0): Counts(commands=1, offset=2)}
    fold_record(windows, *_record("acme/commands/0", 60.0, None))
    assert list(windows) == [("acme/commands/0", 120.0)]


@pytest.mark.parametrize("key, value", [
    (b"not json", b"{}"),
    (b'["acme/commands/0"]', b"{}"),
    (b'["acme/commands/0", [60.0, 119.9]]', b"[1, 2]"),
])
def test_a_malformed_changelog_record_is_a_decode_error(key: bytes, value: bytes) -> None:
    with pytest.raises(DecodeError):
        fold_record({}, key, value)


def test_render_shows_one_line_per_minute_and_tenant() -> None:
    minute = NOW.replace(second=0).timestamp()
    rows = summarise({(table_key("acme", Source.COMMANDS, 0), minute): Counts(commands=3),
                      (table_key("acme", Source.EVENTS, 1), minute): Counts(accepted=2, rejected=1)})
    table = render(rows)
    assert [column.header for column in table.columns] == [
        "minute (UTC)", "tenant", "commands", "accepted", "rejected", "undecodable"]
    assert [list(column.cells) for column in table.columns] == [
        ["2026-03-01 12:30"], ["acme"], ["3"], ["2"], ["1"], ["0"]]
