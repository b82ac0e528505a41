"""The support desk's effects, as its domain declares them, against a provider simulator process."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from keel.domain.effects import idempotency_key
from keel.domain.envelope import Envelope
from keel.domains import Effect, EffectCall, EffectResult, PermanentError, RetryableError, http
from keel.testing import Scenario, scenario
from keel.testing.provider import Fault, Faults, ProviderSimulator

from support_desk import domain, effects
from support_desk.messages import IssueRefund, ReverseRefund, SendEmail, StartSubscription

START = StartSubscription(customer_id="cust-1", plan="pro", monthly_price_cents=5000, currency="EUR")


@pytest.fixture
def provider(keel_provider: ProviderSimulator, monkeypatch: pytest.MonkeyPatch) -> ProviderSimulator:
    """The simulator as the payments and the e-mail provider."""
    monkeypatch.setenv(effects.PAYMENTS_URL, keel_provider.url)
    monkeypatch.setenv(effects.EMAIL_URL, keel_provider.url)
    return keel_provider


def desk() -> Scenario:
    return scenario(domain, tenant="acme", aggregate="sub-1", actor="agent:support-bot").given(START)


def refunded(amount: int = 2000) -> Scenario:
    return desk().when(IssueRefund(amount_cents=amount, currency="EUR", reason="late delivery"))


def effect_of(event: Envelope) -> Effect:
    return next(e for e in domain.effects if e.on.__name__ == event.type)


def call_for(event: Envelope, *, key: str | None = None, deadline_s: float = 5.0) -> EffectCall:
    """What Keel's worker hands the event's declared handler: the effect's own key unless ``key``."""
    return EffectCall(event=event, idempotency_key=key or idempotency_key(event.id), attempt=1,
                      deadline=datetime.now(UTC) + timedelta(seconds=deadline_s), provider=effect_of(event).provider)


async def attempt(call: EffectCall) -> EffectResult:
    result = effect_of(call.event).handler(call)
    return await result if inspect.isawaitable(result) else result


def run(event: Envelope, *, key: str | None = None, deadline_s: float = 5.0) -> EffectResult:
    """One attempt of the event's effect on a loop of its own, closing the loop's session after."""
    async def once() -> EffectResult:
        try:
            return await attempt(call_for(event, key=key, deadline_s=deadline_s))
        finally:
            await http.close()
    return asyncio.run(once())


def test_a_refund_is_made_once_under_the_effects_key(provider: ProviderSimulator) -> None:
    story = refunded()
    event = story.decided.events[0]
    first, retried = run(event), run(event)

    reference = str(story.decided.command.id)
    assert first == retried == {"refund_id": "act_1", "reference": reference, "amount_cents": 2000,
                                "currency": "EUR"}
    action = provider.performed()[idempotency_key(event.id)]
    assert action.count == 1 and action.path == "/v1/refunds"
    assert action.body == {"amount_cents": 2000, "currency": "EUR", "reference": reference}
    assert (action.tenant, action.agent) == ("acme", "support-bot")
    assert provider.stats().replays == 1


def test_a_reversal_reverses_the_refund_its_command_made(provider: ProviderSimulator) -> None:
    story = refunded()
    refund = run(story.decided.events[0])
    reversal = story.when(ReverseRefund(refund_command_id=story.decided.command.id, reason="goodwill undone"))
    result = run(reversal.decided.events[0])

    assert result is not None and refund is not None
    assert result["refund_id"] == refund["refund_id"]
    assert result["reference"] == str(story.decided.command.id)


def test_a_reversal_of_a_refund_never_made_fails_for_good(provider: ProviderSimulator) -> None:
    story = refunded()
    reversal = story.when(ReverseRefund(refund_command_id=story.decided.command.id, reason="undo"))

    with pytest.raises(PermanentError) as failed:
        run(reversal.decided.events[0])
    assert failed.value.code == "refund_not_found"
    assert provider.performed() == {}


def test_an_email_reaches_the_provider_and_its_personal_fields_stay_out_of_the_result(
        provider: ProviderSimulator) -> None:
    story = desk().when(SendEmail(to_address="ada@example.com", template="refund-sent", body="Dear Ada"))
    event = story.decided.events[0]
    result = run(event)

    assert result is not None and result["template"] == "refund-sent"
    assert "ada@example.com" not in json.dumps(result) and "Dear Ada" not in json.dumps(result)
    body = provider.performed()[idempotency_key(event.id)].body
    assert body == {"to": "ada@example.com", "template": "refund-sent", "body": "Dear Ada"}


def test_5xx_answers_are_retryable_and_a_retry_performs_once(provider: ProviderSimulator) -> None:
    events = [refunded(amount).decided.events[0] for amount in range(100, 900, 100)]
    provider.set_faults(Faults(error_rate=1.0, seed=5))
    for event in events:
        with pytest.raises(RetryableError, match="payments answered 50[03]"):
            run(event)
    faults = provider.stats().faults
    assert faults.get(Fault.ERROR_500, 0) > 0 and faults.get(Fault.ERROR_503, 0) > 0
    provider.clear_faults()

    assert [result and result["amount_cents"] for result in map(run, events)] == list(range(100, 900, 100))
    assert sorted(a.count for a in provider.performed().values()) == [1] * len(events)


def test_a_provider_that_does_not_answer_in_time_is_retried_under_the_same_key(provider: ProviderSimulator) -> None:
    event = refunded().decided.events[0]
    provider.set_faults(Faults(timeout_rate=1.0, hang_s=3))
    started = time.monotonic()
    with pytest.raises(RetryableError):
        run(event, deadline_s=0.5)
    assert time.monotonic() - started < 1.5  # the handler gave up by its deadline
    provider.clear_faults()

    assert run(event) is not None
    assert provider.performed()[idempotency_key(event.id)].count == 1


def test_a_second_attempt_while_the_first_is_in_flight_is_retryable(provider: ProviderSimulator) -> None:
    call = call_for(refunded().decided.events[0])
    provider.set_faults(Faults(slow_rate=1.0, slow_ms=300))

    async def both() -> tuple[EffectResult | BaseException, ...]:
        try:
            return await asyncio.gather(attempt(call), attempt(call), return_exceptions=True)
        finally:
            await http.close()

    outcomes = asyncio.run(both())
    assert sum(isinstance(o, RetryableError) and "409" in str(o) for o in outcomes) == 1
    assert sum(isinstance(o, dict) for o in outcomes) == 1


def test_a_key_reused_for_another_refund_fails_for_good(provider: ProviderSimulator) -> None:
    run(refunded(100).decided.events[0], key="key-1")
    with pytest.raises(PermanentError) as failed:
        run(refunded(200).decided.events[0], key="key-1")
    assert failed.value.code == "idempotency_key_reused"


@pytest.mark.parametrize("url", [None, "payments.internal"])
def test_an_unset_or_malformed_url_fails_as_not_configured(provider: ProviderSimulator,
                                                          monkeypatch: pytest.MonkeyPatch, url: str | None) -> None:
    if url is None:
        monkeypatch.delenv(effects.PAYMENTS_URL)
    else:
        monkeypatch.setenv(effects.PAYMENTS_URL, url)
    with pytest.raises(PermanentError) as failed:
        run(refunded().decided.events[0])
    assert failed.value.code == "provider_not_configured"
    assert provider.stats().requests == 0


def test_an_unreachable_provider_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv(effects.PAYMENTS_URL, f"http://127.0.0.1:{port}")
    with pytest.raises(RetryableError, match="did not answer"):
        run(refunded().decided.events[0], key=str(uuid.uuid4()))
