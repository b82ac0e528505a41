"""The breaker watcher's rules without Kafka: signals, window counts, the trip decision, ids."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from keel.domain.envelope import Actor, ActorKind, Envelope, new_command
from keel.domain.messages import BreakerReset, BreakerTripped, CommandRejected, TripBreaker
from support_desk.messages import EmailQueued, StartSubscription, SubscriptionStarted
from keel.domain.outcomes import to_events
from keel.watchers.breaker_rules import (
    BreakerSettings,
    BreakerState,
    Signal,
    SignalKind,
    WindowCounts,
    agent_key,
    should_trip,
    signal_of,
    trip_command,
    trip_command_id,
    window_start,
)

NOW = datetime(2026, 3, 1, 12, 30, 45, tzinfo=UTC)
AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
RULES = BreakerSettings(window_s=60, min_decisions=4, threshold=0.5, stale_after_s=300)
START = window_start(NOW.timestamp(), 60)


def _events(*payloads: object, actor: Actor = AGENT, aggregate: str = "sub-1") -> list[Envelope]:
    command = new_command(StartSubscription(customer_id="c", plan="pro", monthly_price_cents=1,
                                            currency="EUR"),
                          tenant_id="acme", aggregate_id=aggregate, actor=actor)
    return to_events(command, list(payloads), version=0, now=NOW)  # type: ignore[arg-type]


def _started() -> SubscriptionStarted:
    return SubscriptionStarted(customer_id="c", plan="pro", monthly_price_cents=1, currency="EUR")


def _rejected() -> CommandRejected:
    return CommandRejected(command_type="StartSubscription", code="policy_denied", reason="no")


def _signal(kind: SignalKind, offset: int, partition: int = 0, event_id: str = "e") -> Signal:
    return Signal(kind, "acme", "support-bot", partition, offset, event_id)


def _counts(accepted: int, rejected: int, epoch: str = "") -> WindowCounts:
    counts, offset = WindowCounts(epoch=epoch), 0
    for kind in [SignalKind.ACCEPTED] * accepted + [SignalKind.REJECTED] * rejected:
        added = counts.add(_signal(kind, offset), epoch)
        assert added is not None
        counts, offset = added, offset + 1
    return counts


def test_an_agents_first_event_is_its_decision_and_later_ones_are_not() -> None:
    first, second = _events(_started(), EmailQueued(to_address="a@b.c", template="welcome"))
    assert signal_of(first, 2, 10) == Signal(SignalKind.ACCEPTED, "acme", "support-bot", 2, 10,
                                             str(first.id))
    assert signal_of(second, 2, 11) is None


def test_a_rejection_is_a_rejected_decision() -> None:
    [event] = _events(_rejected())
    signal = signal_of(event, 0, 0)
    assert signal is not None and signal.kind is SignalKind.REJECTED
    assert signal.key == agent_key("acme", "support-bot") == "acme/support-bot"


def test_decisions_of_people_and_services_are_not_counted() -> None:
    for kind in (ActorKind.HUMAN, ActorKind.SERVICE):
        [event] = _events(_rejected(), actor=Actor(kind=kind, id="someone"))
        assert signal_of(event, 0, 0) is None


def test_breaker_events_signal_the_agent_in_their_payload() -> None:
    [tripped] = _events(BreakerTripped(agent_id="rogue-bot", reason="r"),
                        actor=Actor(kind=ActorKind.SERVICE, id="keel-breaker-watcher"))
    [reset] = _events(BreakerReset(agent_id="rogue-bot", reason="r"),
                      actor=Actor(kind=ActorKind.HUMAN, id="ops"))
    assert signal_of(tripped, 1, 5) == Signal(SignalKind.TRIPPED, "acme", "rogue-bot", 1, 5,
                                              str(tripped.id))
    assert signal_of(reset, 1, 6) == Signal(SignalKind.RESET, "acme", "rogue-bot", 1, 6, str(reset.id))


def test_a_signal_survives_its_json_round_trip() -> None:
    signal = _signal(SignalKind.REJECTED, 7, partition=3)
    assert Signal.from_json(signal.to_json()) == signal


def test_a_redelivered_decision_is_not_counted_twice_but_other_partitions_are() -> None:
    counts = _counts(accepted=1, rejected=1)
    assert counts.add(_signal(SignalKind.REJECTED, 1), "") is None
    other = counts.add(_signal(SignalKind.REJECTED, 0, partition=1), "")
    assert other is not None and (other.decisions, other.rejections) == (3, 2)
    assert WindowCounts.from_json(other.to_json()) == other


def test_breaker_signals_are_not_window_counts() -> None:
    with pytest.raises(ValueError):
        WindowCounts().add(_signal(SignalKind.TRIPPED, 0), "")


@pytest.mark.parametrize(("accepted", "rejected", "trips"), [
    (2, 2, True),    # 50 % of 4: at the threshold
    (1, 3, True),
    (3, 1, False),   # 25 %
    (0, 3, False),   # too few decisions
    (10, 9, False),  # 47 %
])
def test_trip_needs_enough_decisions_and_the_threshold(accepted: int, rejected: int, trips: bool) -> None:
    counts = _counts(accepted, rejected)
    assert should_trip(counts, BreakerState(), RULES, start=START, now=NOW.timestamp()) is trips


def test_no_trip_while_open_after_a_sent_trip_or_for_a_stale_window() -> None:
    counts = _counts(0, 5)
    now = NOW.timestamp()
    assert should_trip(counts, BreakerState(), RULES, start=START, now=now)
    assert not should_trip(counts, BreakerState(tripped=True), RULES, start=START, now=now)
    assert not should_trip(counts.mark_sent(), BreakerState(), RULES, start=START, now=now)
    assert not should_trip(counts, BreakerState(), RULES, start=START, now=START + 60 + 301)


def test_a_reset_starts_the_window_over_in_a_new_epoch() -> None:
    before = _counts(0, 5).mark_sent()
    breaker = BreakerState(tripped=True).apply(_signal(SignalKind.RESET, 9, event_id="reset-1"))
    assert breaker == BreakerState(tripped=False, epoch="reset-1")
    assert not should_trip(before, breaker, RULES, start=START, now=NOW.timestamp()), "old epoch"
    after = before.add(_signal(SignalKind.REJECTED, 5), breaker.epoch)
    assert after is not None and (after.decisions, after.rejections, after.sent) == (1, 1, False)
    assert after.offsets == {"0": 5}
    assert BreakerState().apply(_signal(SignalKind.TRIPPED, 1)) == BreakerState(tripped=True)


def test_trip_ids_are_deterministic_per_tenant_agent_window_and_epoch() -> None:
    first = trip_command_id("acme", "bot", START, "")
    assert first == trip_command_id("acme", "bot", START, "")
    assert len({first, trip_command_id("globex", "bot", START, ""),
                trip_command_id("acme", "bot-2", START, ""),
                trip_command_id("acme", "bot", START + 60, ""),
                trip_command_id("acme", "bot", START, "reset-1")}) == 5


def test_window_start_is_fausts_tumbling_arithmetic() -> None:
    assert window_start(125.5, 60) == 120.0
    assert window_start(120.0, 60) == 120.0


def test_the_trip_command_is_a_system_command_on_the_tenants_controls() -> None:
    counts = _counts(1, 3)
    command = trip_command("acme", "support-bot", counts, RULES, start=START, now=NOW)
    assert command.id == trip_command_id("acme", "support-bot", START, "")
    assert isinstance(command.payload, TripBreaker) and command.payload.agent_id == "support-bot"
    assert command.key == "acme/controls"
    assert command.actor == Actor(kind=ActorKind.SERVICE, id="keel-breaker-watcher")
    assert command.authority.role == "system"
    assert command.payload.reason.startswith(
        "3 of 4 decisions rejected in the 60s window from 2026-03-01T12:30:00")
    assert isinstance(command.id, uuid.UUID)


def test_settings_come_from_keel_breaker_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_BREAKER_MIN_DECISIONS", "7")
    monkeypatch.setenv("KEEL_BREAKER_THRESHOLD", "0.25")
    monkeypatch.setenv("KEEL_BREAKER_WINDOW_S", "30")
    rules = BreakerSettings()
    assert (rules.min_decisions, rules.threshold, rules.window_s) == (7, 0.25, 30)
