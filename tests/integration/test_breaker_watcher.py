"""The breaker watcher against the real broker: one TripBreaker per bad agent, none for others.

The watcher runs as its own process (``keel watch breakers``) on this test's topics. The
test plays the processor: it writes the decision events agents' commands would produce
(all stamped in one window) and the BreakerTripped / BreakerReset events, and reads back
the commands the watcher sends.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Producer

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, Envelope, new_command
from keel.domain.messages import BreakerReset, BreakerTripped, CommandRejected, ResetBreaker, TripBreaker
from support_desk.messages import EmailQueued, StartSubscription, SubscriptionStarted
from keel.domain.outcomes import to_events
from keel.kafka.clients import producer_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.watchers.breaker import app_id
from keel.watchers.breaker_rules import trip_command_id, window_start
from tests.processes import KeelProcess, remove_app_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RECOVERED = '"event": "breaker_tables_recovered"'
WINDOW_S = 60.0
OPS = Actor(kind=ActorKind.HUMAN, id="ops-oncall")


def _watcher(settings: Settings, log: Path) -> KeelProcess:
    """A ``keel watch breakers`` worker on this test's topics, its output in ``log``."""
    return KeelProcess(["watch", "breakers"], settings, log, KEEL_BREAKER_WINDOW_S=str(WINDOW_S),
                       KEEL_BREAKER_MIN_DECISIONS="5", KEEL_BREAKER_THRESHOLD="0.5")


@pytest.fixture
def watcher(settings: Settings, tmp_path: Path) -> Iterator[KeelProcess]:
    """A watcher on this test's topics; killed at the end, its topics and group removed."""
    running = _watcher(settings, tmp_path / "watcher.log")
    try:
        yield running
    finally:
        running.stop(grace_s=5.0)
        remove_app_state(settings, app_id(settings))


@pytest.fixture
def second(settings: Settings, watcher: KeelProcess) -> Iterator[KeelProcess]:
    """Another worker of the same watcher (same group); stopped before ``watcher`` cleans up."""
    running = _watcher(settings, watcher.log.with_name("second.log"))
    try:
        yield running
    finally:
        running.stop(grace_s=5.0)


def _decisions(tenant: str, agent: str, *, accepted: int, rejected: int) -> list[Envelope]:
    """The events the processor writes for an agent's commands: one decision each."""
    actor, now, out = Actor(kind=ActorKind.AGENT, id=agent), datetime.now(UTC), []
    for index in range(accepted + rejected):
        command = new_command(
            StartSubscription(customer_id=f"c-{index}", plan="pro", monthly_price_cents=900,
                              currency="EUR"),
            tenant_id=tenant, aggregate_id=f"sub-{uuid.uuid4().hex[:8]}", actor=actor)
        if index < accepted:  # a second event of one command is not a second decision
            outcome = [SubscriptionStarted(customer_id="c", plan="pro", monthly_price_cents=900,
                                           currency="EUR"),
                       EmailQueued(to_address="c@example.com", template="welcome")]
        else:
            outcome = [CommandRejected(command_type=command.type, code="policy_denied",
                                       reason="over the refund limit")]
        out += to_events(command, outcome, version=0, now=now)
    return out


def _breaker_event(tenant: str, agent: str, *, reset: bool, version: int) -> Envelope:
    """What the processor writes when an operator trips or resets an agent's breaker."""
    payload = (ResetBreaker if reset else TripBreaker)(agent_id=agent, reason="by hand")
    command = new_command(payload, tenant_id=tenant, aggregate_id="controls", actor=OPS)
    event = (BreakerReset if reset else BreakerTripped)(agent_id=agent, reason="by hand")
    [envelope] = to_events(command, [event], version=version, now=datetime.now(UTC))
    return envelope


def _produce(settings: Settings, events: list[Envelope], timestamp_s: float) -> None:
    """Write ``events`` to the events topic, all with the Kafka timestamp ``timestamp_s``."""
    codec, producer = EnvelopeCodec(), Producer(producer_config(settings))
    for event in events:
        producer.produce(topic_name(settings, Topic.EVENTS), codec.encode(event), key=event.key,
                         timestamp=int(timestamp_s * 1000))
    assert producer.flush(15) == 0


def _trips(settings: Settings) -> list[tuple[Envelope, bytes | None, int | None]]:
    """Every TripBreaker on the commands topic, with its Kafka key and partition."""
    codec = EnvelopeCodec()
    found = []
    for message in read_to_end(settings, topic_name(settings, Topic.COMMANDS)):
        command = codec.decode(message.value() or b"")
        if command.type == "TripBreaker":
            found.append((command, message.key(), message.partition()))
    return found


def _wait_for(check: Callable[[], bool], what: str, watcher: KeelProcess, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        watcher.assert_alive()
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _partition_of(settings: Settings, key: str) -> int:
    """The partition librdkafka's murmur2 partitioner (the processor's view) gives ``key``."""
    placed: list[int | None] = []
    producer = Producer(producer_config(settings))
    producer.produce(topic_name(settings, Topic.DLQ), b"probe", key=key,
                     on_delivery=lambda _err, message: placed.append(message.partition()))
    assert producer.flush(15) == 0
    assert placed[0] is not None
    return placed[0]


def test_breaker_trips_once_for_the_bad_agent_only_and_respects_open_and_reset(
    settings: Settings, watcher: KeelProcess, second: KeelProcess
) -> None:
    stamp = time.time()
    start = window_start(stamp, WINDOW_S)
    # two workers: an agent's decisions land on every events partition, its counts in one place
    watcher.start()
    second.start()
    both = (watcher, second)
    _wait_for(lambda: all(w.count(RECOVERED) for w in both), "both workers to start", watcher)
    time.sleep(2.0)  # let the group settle before the first events

    def seen(text: str) -> int:
        return sum(w.count(text) for w in both)

    # flaky-bot's breaker is already open (tripped by hand): its rejections must not trip it.
    _produce(settings, [_breaker_event("acme", "flaky-bot", reset=False, version=1)], stamp)
    _wait_for(lambda: seen('"event": "breaker_tripped"') >= 1,
              "the watcher to see flaky-bot's open breaker", watcher)
    # The decisions reach the watcher interleaved across the events partitions, and a window
    # trips as soon as any prefix of at least 5 decisions is half rejected: the healthy agent
    # has too few rejections for any order to do that (2 of 5 is 40 %).
    _produce(settings,
             _decisions("acme", "rogue-bot", accepted=2, rejected=6)       # 75 % rejected: trips
             + _decisions("acme", "support-bot", accepted=10, rejected=2)  # 17 %: healthy
             + _decisions("acme", "flaky-bot", accepted=0, rejected=6)     # open already
             + _decisions("globex", "rogue-bot", accepted=0, rejected=4),  # too few decisions
             stamp)
    rogue_id = trip_command_id("acme", "rogue-bot", start, "")
    _wait_for(lambda: len(_trips(settings)) >= 1, "a TripBreaker command", watcher)
    time.sleep(3.0)  # a second (wrong) trip would be sent by now

    trips = _trips(settings)
    # At least once: a rebalance may re-send the trip, always under the same id.
    assert {t.id for t, _, _ in trips} == {rogue_id}, [(t.id, t.payload) for t, _, _ in trips]
    trip, key, partition = trips[0]
    assert isinstance(trip.payload, TripBreaker)
    assert (trip.tenant_id, trip.aggregate_id, trip.payload.agent_id) == ("acme", "controls", "rogue-bot")
    assert trip.actor == Actor(kind=ActorKind.SERVICE, id="keel-breaker-watcher")
    assert trip.authority.role == "system"
    assert re.match(r"\d+ of \d+ decisions rejected in the 60s window", trip.payload.reason)
    assert key == b"acme/controls" == trip.key.encode()
    assert partition == _partition_of(settings, "acme/controls")

    # After a reset, flaky-bot's counts start again; new rejections trip it under a new id.
    reset = _breaker_event("acme", "flaky-bot", reset=True, version=2)
    _produce(settings, [reset], stamp)
    _wait_for(lambda: seen('"event": "breaker_reset"') >= 1,
              "the watcher to see flaky-bot's reset", watcher)
    _produce(settings, _decisions("acme", "flaky-bot", accepted=1, rejected=4), stamp)
    flaky_id = trip_command_id("acme", "flaky-bot", start, str(reset.id))
    _wait_for(lambda: flaky_id in {t.id for t, _, _ in _trips(settings)}, "flaky-bot's trip", watcher)

    # kill -9 both and restart one: the tables come back, nothing trips again under a new id.
    second.stop(sig=signal.SIGKILL)
    watcher.stop(sig=signal.SIGKILL)
    watcher.start()
    _wait_for(lambda: watcher.count(RECOVERED) >= 2, "the restarted watcher to recover", watcher)
    _produce(settings, _decisions("acme", "rogue-bot", accepted=0, rejected=3), stamp)
    time.sleep(4.0)
    trips = _trips(settings)
    assert {t.id for t, _, _ in trips} == {rogue_id, flaky_id}
