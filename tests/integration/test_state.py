"""Point-in-time state from the events projection, folded with the processor's own ``evolve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
from clickhouse_connect.driver.client import Client

from keel.config import Settings
from keel.domain.aggregate import EMPTY as INITIAL, evolve_aggregate as evolve
from support_desk.subscription import Status, SubscriptionState
from keel.projector.projector import EventProjector
from keel.replay.errors import ReplayError
from keel.replay.state import parse_at, state_at, unprojected_events
from tests.integration.test_projector import produce, subscription_story

pytestmark = pytest.mark.integration


@pytest.fixture
def projected(settings: Settings, migrated: Client) -> Client:
    produce(settings, subscription_story("acme", "sub-1") + subscription_story("globex", "sub-1", emails=3))
    with EventProjector(settings, migrated) as projector:
        projector.catch_up()
    return migrated


def test_state_at_each_version_is_the_fold_of_the_events_up_to_it(projected: Client) -> None:
    story = subscription_story("acme", "sub-1")  # the same commands: started, refund, email, cancel, rejected
    expected = INITIAL
    for event in [e for e in story if e.version is not None]:
        expected = evolve(expected, event)
        found = state_at(projected, "acme", "sub-1", event.version or 0, evolve=evolve, initial=INITIAL)
        assert found.state.version == event.version
        domain, expected_domain = cast(SubscriptionState, found.state.domain), cast(SubscriptionState, expected.domain)
        assert (domain.status, domain.refunded_cents, domain.emails_queued) == (
            expected_domain.status, expected_domain.refunded_cents, expected_domain.emails_queued)
        assert found.events[-1].type == event.type

    at_refund = state_at(projected, "acme", "sub-1", 2, evolve=evolve, initial=INITIAL)
    at_refund_domain = cast(SubscriptionState, at_refund.state.domain)
    assert (at_refund_domain.status, at_refund_domain.refunded_cents) == (Status.ACTIVE, 1000)
    assert [e.type for e in at_refund.events] == ["SubscriptionStarted", "RefundIssued"]


def test_state_at_a_time_includes_only_what_had_happened(projected: Client) -> None:
    everything = state_at(projected, "acme", "sub-1", 4, evolve=evolve, initial=INITIAL)
    first = everything.events[0].occurred_at

    before = state_at(projected, "acme", "sub-1", first - timedelta(seconds=1), evolve=evolve, initial=INITIAL)
    latest = state_at(projected, "acme", "sub-1", parse_at("2999-01-01T00:00:00Z"), evolve=evolve, initial=INITIAL)

    assert before.state == INITIAL and before.events == ()
    assert cast(SubscriptionState, latest.state.domain).status is Status.CANCELLED
    assert latest.events[-1].type == "CommandRejected"


@pytest.mark.parametrize(("tenant", "aggregate", "at", "code"), [
    ("acme", "sub-1", 99, "version_not_found"),
    ("acme", "nope", 1, "unknown_aggregate"),
    ("initech", "sub-1", 1, "unknown_aggregate"),
])
def test_unknown_aggregates_and_versions_are_refused(projected: Client, tenant: str, aggregate: str, at: int,
                                                      code: str) -> None:
    with pytest.raises(ReplayError) as refused:
        state_at(projected, tenant, aggregate, at, evolve=evolve, initial=INITIAL)

    assert refused.value.code == code


def test_cli_prints_state_and_history_as_json(settings: Settings, tmp_path: Path) -> None:
    produce(settings, subscription_story("acme", "sub-1"))
    env = {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
           "KEEL_TOPIC_PARTITIONS": str(settings.topic_partitions), "KEEL_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch",
           "KEEL_DATA_DIR": str(settings.data_dir)}
    cli = [sys.executable, "-m", "keel.cli"]
    subprocess.run([*cli, "project"], env=env, check=True, capture_output=True, timeout=120)

    done = subprocess.run([*cli, "state", "--tenant", "acme", "--aggregate", "sub-1", "--at", "2", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["state"]["status"] == "active" and answer["state"]["refunded_cents"] == 1000
    assert [e["type"] for e in answer["events"]] == ["SubscriptionStarted", "RefundIssued"]


def test_state_reads_the_events_the_projection_does_not_hold_yet_from_kafka_and_says_so(
        settings: Settings, migrated: Client) -> None:
    story = subscription_story("acme", "sub-1")
    produce(settings, story[:2])
    with EventProjector(settings, migrated) as projector:
        projector.catch_up()
    produce(settings, story[2:])  # committed, not projected: the projector is behind

    tail = unprojected_events(settings, migrated, "acme", "sub-1")
    latest = max(e.version or 0 for e in story)
    found = state_at(migrated, "acme", "sub-1", latest, evolve=evolve, initial=INITIAL, tail=tail)

    assert found.state.version == latest and cast(SubscriptionState, found.state.domain).status is Status.CANCELLED
    assert found.unprojected == len(story) - 2
    cut = next(i for i, e in enumerate(story) if e.version == latest) + 1
    assert [e.id for e in found.events] == [e.id for e in story[:cut]]
    with pytest.raises(ReplayError) as stale:  # without Kafka's tail, the newest version is not there
        state_at(migrated, "acme", "sub-1", latest, evolve=evolve, initial=INITIAL)
    assert stale.value.code == "version_not_found"
