"""Judging an attempt: results that can be recorded, errors that are retried, and timeouts."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest

from keel.domain.envelope import Actor, ActorKind, new_command
from keel.domain.commands import OpenProviderBreaker
from keel.domains.model import Effect, EffectCall, EffectResult, PermanentError, RetryableError
from keel.domain.payloads import Event
from keel.effects.calls import MAX_RESULT_CHARS, BadResult, Done, Failed, attempt, result_text

CALL = EffectCall(event=new_command(OpenProviderBreaker(provider="cards", reason="r"), tenant_id="acme",
                                    aggregate_id="controls", actor=Actor(kind=ActorKind.SERVICE, id="s")),
                  idempotency_key=f"keel-{uuid.uuid4()}", attempt=1, deadline=datetime.now(UTC), provider="cards")


@pytest.mark.parametrize(("result", "text"), [(None, "null"), ({}, "{}"), ({"id": "r_1", "n": [1, 2.5]},
                                                                          '{"id":"r_1","n":[1,2.5]}')])
def test_a_json_object_or_none_is_recorded_as_json_text(result: Any, text: str) -> None:
    assert result_text(result) == text


@pytest.mark.parametrize("result", [["a list"], "text", 3, {"when": datetime.now(UTC)}, {"nan": float("nan")},
                                    {"big": "x" * MAX_RESULT_CHARS}])
def test_anything_else_is_a_bad_result(result: Any) -> None:
    with pytest.raises(BadResult) as raised:
        result_text(result)
    assert raised.value.code == "bad_result"


def _run(handler: Any, timeout_s: float = 1.0) -> Done | Failed:
    effect = Effect(on=Event, handler=handler, provider="cards", timeout_s=timeout_s)
    with ThreadPoolExecutor(2) as pool:
        return asyncio.run(attempt(effect, CALL, pool))


def test_sync_handlers_run_off_the_loop_and_async_ones_on_it() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def sync(call: EffectCall) -> EffectResult:
        seen.append(threading.get_ident())
        return {"key": call.idempotency_key}

    async def on_loop(call: EffectCall) -> EffectResult:
        seen.append(threading.get_ident())
        return None

    assert _run(sync) == Done(f'{{"key":"{CALL.idempotency_key}"}}')
    assert _run(on_loop) == Done("null")
    assert seen[0] != loop_thread and seen[1] == loop_thread


def _raises(exc: BaseException) -> Any:
    def handler(call: EffectCall) -> EffectResult:
        raise exc
    return handler


def test_errors_are_retried_unless_permanent_and_garbage_fails_at_once() -> None:
    assert _run(_raises(RetryableError("503"))) == Failed("retryable", "RetryableError: 503", retryable=True)
    assert _run(_raises(KeyError("x"))) == Failed("handler_error", "KeyError: 'x'", retryable=True)
    assert _run(_raises(PermanentError("card_declined", "no"))) == Failed("card_declined", "no", retryable=False)
    assert _run(_raises(PermanentError("", "no"))) == Failed("permanent_error", "no", retryable=False)
    assert _run(_raises(PermanentError("x" * 500, "no"))) == Failed("x" * 100, "no", retryable=False)
    bad = _run(lambda call: ["list"])
    assert isinstance(bad, Failed) and bad.code == "bad_result" and not bad.retryable and bad.answered


def test_a_handler_past_its_timeout_is_a_retryable_timeout_whether_sync_or_async() -> None:
    async def stuck(call: EffectCall) -> EffectResult:
        await asyncio.sleep(10)
        return None

    started = time.monotonic()
    assert _run(stuck, timeout_s=0.1) == Failed("timeout", "no answer within 0.1s", retryable=True)
    assert _run(lambda call: time.sleep(0.5), timeout_s=0.1) == Failed("timeout", "no answer within 0.1s",
                                                                       retryable=True)
    assert time.monotonic() - started < 2.0
