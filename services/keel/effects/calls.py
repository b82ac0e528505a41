"""One attempt of an effect: call its handler within the timeout and judge what came back.

Async handlers run on the worker's event loop; synchronous ones in a bounded thread pool,
so a blocking client cannot stall the loop. A thread cannot be killed: when a synchronous
handler outlives its timeout the worker stops waiting and counts a timeout, but the
thread runs on (holding its place in the pool) until the handler returns. Handlers
should honour ``EffectCall.deadline``.

A retryable error, a timeout and any exception the handler did not mean are retried: the
outcome at the provider is unknown, and the idempotency key makes asking again safe. A
``PermanentError`` fails the effect at once. A result that is not a JSON object (or
``None``) of at most ``MAX_RESULT_CHARS`` fails it as ``bad_result``: retrying would not
change what the handler returns.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from concurrent.futures import Executor
from dataclasses import dataclass

from keel.domains.model import Effect, EffectCall, EffectResult, PermanentError, RetryableError
from keel.errors import KeelError

MAX_RESULT_CHARS = 100_000
"""The longest result, as JSON text, that ``CompleteEffect`` carries."""
MAX_CODE_CHARS = 100
"""The longest failure code ``FailEffect`` carries."""


class BadResult(KeelError):
    """A handler returned something Keel cannot record as the effect's result."""

    code = "bad_result"


@dataclass(frozen=True)
class Done:
    """The handler succeeded; ``result`` is its JSON text."""

    result: str


@dataclass(frozen=True)
class Failed:
    """The attempt failed: ``retryable`` says whether another attempt may succeed."""

    code: str
    error: str
    retryable: bool

    @property
    def answered(self) -> bool:
        """Whether the provider answered (a breaker counts only the attempts it did not)."""
        return not self.retryable


Attempt = Done | Failed


def result_text(result: object) -> str:
    """``result`` as the JSON text ``CompleteEffect`` records; raises ``BadResult``."""
    if result is not None and not isinstance(result, dict):
        raise BadResult(f"a handler returns a JSON object or None, not a {type(result).__name__}")
    try:
        text = json.dumps(result, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise BadResult(f"the result is not JSON: {exc}") from exc
    if len(text) > MAX_RESULT_CHARS:
        raise BadResult(f"the result is {len(text)} characters of JSON; at most {MAX_RESULT_CHARS} are recorded")
    return text


async def attempt(effect: Effect, call: EffectCall, pool: Executor) -> Attempt:
    """Run one attempt of ``effect`` and judge it."""
    try:
        result = await asyncio.wait_for(_invoke(effect, call, pool), effect.timeout_s)
    except RetryableError as exc:
        return Failed("retryable", _message(exc), retryable=True)
    except PermanentError as exc:
        return Failed(str(exc.code)[:MAX_CODE_CHARS] or "permanent_error", str(exc.message), retryable=False)
    except TimeoutError:
        return Failed("timeout", f"no answer within {effect.timeout_s:g}s", retryable=True)
    except Exception as exc:  # noqa: BLE001 - whatever a team's handler raises: unknown outcome, so retried
        return Failed("handler_error", _message(exc), retryable=True)
    try:
        return Done(result_text(result))
    except BadResult as exc:
        return Failed(exc.code, exc.message, retryable=False)


async def _invoke(effect: Effect, call: EffectCall, pool: Executor) -> EffectResult:
    handler = effect.handler
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None)):
        returned = handler(call)
    else:
        returned = await asyncio.get_running_loop().run_in_executor(pool, handler, call)
    if inspect.isawaitable(returned):
        return await returned
    return returned


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
