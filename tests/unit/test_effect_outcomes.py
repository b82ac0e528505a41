"""Deciding effect outcomes: one outcome per generation, retries only of failed or cancelled
effects, and only Keel's own workers report what a handler did."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keel.domain.aggregate import AggregateState
from keel.domain.commands import (
    CancelEffect,
    CloseProviderBreaker,
    CompleteEffect,
    FailEffect,
    OpenProviderBreaker,
    RetryEffect,
)
from keel.domain.effects import EffectMark, fold_effects, idempotency_key, outcome_command_id
from keel.domain.envelope import Actor, ActorKind, Envelope, Payload, new_command
from keel.domain.events import CommandRejected, EffectRetried
from keel.domain.governance.controls import Controls, TenantControls
from keel.domain.governance.pipeline import CONTROLS_AGGREGATE, Context, govern
from keel.domain.governance.ratelimit import RateLimiter
from keel.domain.outcomes import to_events
from keel.domains import Aggregate, Command, Domain, Effect, Event
from keel.domains.registry import DomainError, Registry, build

WORKER = Actor(kind=ActorKind.SERVICE, id="keel-effects")
OPERATOR = Actor(kind=ActorKind.HUMAN, id="olga.ops")
EFFECT, ORIGIN = uuid.uuid4(), uuid.uuid4()
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


class Charge(Command):
    cents: int


class Charged(Event):
    cents: int


class Noted(Event):
    text: str


def _domain(tmp_path: Path, *effects: Effect) -> Domain:
    aggregate = Aggregate(name="card", initial=0, commands=(Charge,), events=(Charged, Noted),
                          decide=lambda s, c: [Charged(cents=1)], evolve=lambda s, e: s + 1)
    return Domain(name="cards", home=tmp_path, aggregates=(aggregate,), effects=effects)


def _send(payload: Payload, state: AggregateState, actor: Actor = WORKER, controls: TenantControls | None = None,
          command_id: uuid.UUID | None = None) -> tuple[list[Envelope], AggregateState]:
    aggregate = CONTROLS_AGGREGATE if isinstance(payload, (OpenProviderBreaker, CloseProviderBreaker)) else "card-1"
    command = new_command(payload, tenant_id="acme", aggregate_id=aggregate, actor=actor, command_id=command_id)
    decision = govern(command, state, Context(controls or TenantControls(), RateLimiter(), NOW))
    if controls is not None:
        folded = Controls({"acme": controls})
        for key, value in decision.controls:
            folded.apply(key, value)
    effects = state.effects
    for event in decision.events:
        effects = fold_effects(effects, event, Registry())
    return decision.events, replace(state, effects=effects)


def _code(events: list[Envelope]) -> str:
    [event] = events
    assert isinstance(event.payload, CommandRejected), event.type
    return event.payload.code


OPEN = AggregateState(version=3, effects={EFFECT: EffectMark(ORIGIN, 0, True)})


def test_the_first_outcome_settles_an_effect_and_every_later_one_is_refused() -> None:
    done = CompleteEffect(effect_id=EFFECT, generation=0, provider="payments", attempts=2, result='{"id": "r_1"}')
    [succeeded], state = _send(done, OPEN)
    assert succeeded.type == "EffectSucceeded" and succeeded.payload.origin_command_id == ORIGIN  # type: ignore[attr-defined]
    assert EFFECT not in state.effects  # a succeeded effect can never change again
    failed = FailEffect(effect_id=EFFECT, generation=0, provider="payments", attempts=3, code="timeout", error="x")
    assert _code(_send(failed, state)[0]) == "unknown_effect"
    assert _code(_send(CancelEffect(effect_id=EFFECT, code="cancelled_by_operator", reason="no"), state,
                       OPERATOR)[0]) == "unknown_effect"


def test_an_operator_cannot_report_a_handler_outcome_but_may_cancel_and_retry() -> None:
    done = CompleteEffect(effect_id=EFFECT, generation=0, provider="payments", attempts=1, result="{}")
    assert _code(_send(done, OPEN, OPERATOR)[0]) == "system_only"
    retry = RetryEffect(effect_id=EFFECT, reason="again", event_partition=1, event_offset=42)
    assert _code(_send(retry, OPEN, OPERATOR)[0]) == "effect_open"

    [cancelled], state = _send(CancelEffect(effect_id=EFFECT, code="cancelled_by_operator", reason="wrong amount"),
                               OPEN, OPERATOR)
    assert cancelled.type == "EffectCancelled" and not state.effects[EFFECT].open
    assert _code(_send(done, state)[0]) == "effect_settled"  # the worker's late report loses

    [retried], state = _send(retry, state, OPERATOR)
    assert isinstance(retried.payload, EffectRetried)
    assert (retried.payload.generation, retried.payload.event_offset) == (1, 42)
    assert state.effects[EFFECT] == EffectMark(ORIGIN, 1, True)
    assert _code(_send(done, state)[0]) == "effect_settled"  # generation 0's report is stale
    [succeeded], _ = _send(done.model_copy(update={"generation": 1}), state)
    assert succeeded.type == "EffectSucceeded"


def test_outcome_ids_and_keys_are_deterministic_per_effect_and_generation() -> None:
    assert outcome_command_id(EFFECT, 0) == outcome_command_id(EFFECT, 0) != outcome_command_id(EFFECT, 1)
    assert idempotency_key(EFFECT) == f"keel-{EFFECT}"


def test_provider_breakers_open_once_and_close_through_the_controls_topic() -> None:
    controls = TenantControls()
    [opened], _ = _send(OpenProviderBreaker(provider="payments", reason="5 failures"), OPEN, controls=controls)
    assert opened.type == "ProviderBreakerOpened" and controls.open_providers == {"payments"}
    assert _code(_send(OpenProviderBreaker(provider="payments", reason="again"), OPEN,
                       controls=controls)[0]) == "already_open"
    [closed], _ = _send(CloseProviderBreaker(provider="payments", reason="probe ok"), OPEN, controls=controls)
    assert closed.type == "ProviderBreakerClosed" and controls.open_providers == set()
    assert _code(_send(CloseProviderBreaker(provider="payments", reason="x"), OPEN,
                       controls=controls)[0]) == "not_open"


def test_an_event_with_an_effect_opens_it_in_the_fold(tmp_path: Path) -> None:
    registry = build([_domain(tmp_path, Effect(on=Charged, handler=lambda call: None, provider="cards"))],
                     check_schemas=False)
    command = new_command(Charge(cents=5), tenant_id="acme", aggregate_id="card-1", actor=OPERATOR)
    charged, noted = to_events(command, [Charged(cents=5), Noted(text="hi")], version=0, now=NOW)
    effects = fold_effects({}, charged, registry)
    assert effects == {charged.id: EffectMark(command.id, 0, True)}
    assert fold_effects(effects, noted, registry) is effects


@pytest.mark.parametrize(("changes", "message"), [
    ({"provider": "Payments Inc"}, "is not a name like"),
    ({"timeout_s": 0}, "timeout_s > 0"),
    ({"max_attempts": 0}, "max_attempts >= 1"),
    ({"handler": "not callable"}, "no callable handler"),
])
def test_an_effect_that_cannot_run_stops_the_registry(tmp_path: Path, changes: dict[str, object],
                                                      message: str) -> None:
    effect = replace(Effect(on=Charged, handler=lambda call: None, provider="cards"), **changes)  # type: ignore[arg-type]
    with pytest.raises(DomainError, match=message) as raised:
        build([_domain(tmp_path, effect)], check_schemas=False)
    assert raised.value.code == "effect_invalid" and raised.value.type_name == "Charged"


def test_two_effects_for_one_event_or_an_effect_on_a_foreign_event_are_refused(tmp_path: Path) -> None:
    effect = Effect(on=Charged, handler=lambda call: None, provider="cards")
    with pytest.raises(DomainError, match="two effects"):
        build([_domain(tmp_path, effect, effect)], check_schemas=False)
    with pytest.raises(DomainError, match="no event of this domain"):
        build([_domain(tmp_path, replace(effect, on=EffectRetried))], check_schemas=False)
