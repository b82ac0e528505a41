"""One effect from its turn to its outcome: guards, attempts, backoff, breakers and reports.

Right before every attempt the runner checks again what may have changed while the effect
queued or waited: its agent or its command type switched off (it waits, looking again within
``RECHECK_S`` at first and ``LONGEST_RECHECK_S`` at most, and runs once released; a switch
thrown after an approval stops it the same way), its provider's breaker open (it waits
without calling), or its command undone by a compensating event (it is cancelled,
``undone``). A compensation's own effect always runs: no worker can know that an effect it
cancelled was not attempted by a worker that crashed before it, so the provider decides (a
reversal of a refund it never made fails as ``refund_not_found``). Each outcome is a
command with the id ``outcome_command_id`` gives, sent by the ``keel-effects`` actor to the
event's own aggregate; the effect counts as settled once Kafka acknowledged it. Every change
of state is reported on the effects topic: each attempt (``running``), each wait with its
reason, each backoff with the time of the next attempt, and the last error when there is one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from opentelemetry.trace import StatusCode

from keel.domain.commands import CancelEffect, CloseProviderBreaker, CompleteEffect, FailEffect, OpenProviderBreaker
from keel.domain.effects import idempotency_key, outcome_command_id
from keel.observability.metrics import EFFECT_ATTEMPTS, EFFECT_OUTCOMES, EFFECT_RETRIES, tenant_label
from keel.domain.envelope import Actor, ActorKind, Payload, new_command
from keel.domain.governance.controls import Controls
from keel.domain.governance.pipeline import CONTROLS_AGGREGATE
from keel.domains.model import Effect, EffectCall
from keel.domains.registry import Registry
from keel.effects.backoff import retry_delay
from keel.effects.breakers import Admission, BreakerKey, Breakers, Transition
from keel.effects.calls import Attempt, Done, Failed, attempt
from keel.effects.jobs import UNKNOWN_PROVIDER, Job, Located, Trigger
from keel.effects.opening import Opener
from keel.effects.progress import EffectReport, EffectState, WaitReason
from keel.effects.scheduler import Limits
from keel.effects.sending import Sender
from keel.effects.spans import attempt_span
from keel.observability import tracing
from keel.errors import DeliveryError, KeelError

log = logging.getLogger(__name__)

EFFECTS_ACTOR = Actor(kind=ActorKind.SERVICE, id="keel-effects")
RECHECK_S = 0.2
"""How soon a waiting effect looks again at the switch or breaker it waits on; the interval grows
by half at each look, up to ``LONGEST_RECHECK_S``, so many long waits cost little."""
LONGEST_RECHECK_S = 1.0
RESEND_AFTER_S = 1.0
_DETAIL_CHARS, _REASON_CHARS, _ERROR_CHARS = 2000, 1000, 10_000

Locate = Callable[[Located, uuid.UUID], Awaitable[Trigger | None]]


@dataclass
class EffectStats:
    """Counters since start, for logs and benchmarks (read them from any thread)."""

    attempts: int = 0
    """Attempts started: calls of a handler."""
    retried: int = 0
    """Attempts that failed retryably and were followed by a backoff."""
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


@dataclass(frozen=True)
class _Wait:
    reason: WaitReason
    detail: str


class _Stop(Enum):
    DROPPED = "dropped"
    UNDONE = "undone"


class EffectRunner:
    """Runs jobs to their outcome; ``stopping`` ends every job at its next turn, without an outcome."""

    def __init__(self, *, worker: str, registry: Registry, controls: Controls, breakers: Breakers, limits: Limits,
                 sender: Sender, opener: Opener, pool: Executor, locate: Locate,
                 stats: EffectStats, rng: random.Random | None = None) -> None:
        self._worker, self._registry, self._controls, self._breakers = worker, registry, controls, breakers
        self._limits, self._sender, self._opener = limits, sender, opener
        self._pool, self._locate, self.stats = pool, locate, stats
        self._rng = rng or random.Random()
        self.stopping = False
        self.busy = 0
        """Jobs in an attempt or sending their outcome: a stopping worker waits for them."""

    async def run(self, job: Job) -> None:
        """Run ``job`` until it is settled, dropped, or the worker stops."""
        if job.dropped or self.stopping or (job.located is not None and job.trigger is None
                                            and not await self._find(job)):
            return
        if job.effect is None or job.trigger is None:
            await self._without_handler(job)
            return
        await self._attempts(job, job.effect, job.trigger)

    async def _find(self, job: Job) -> bool:
        """Read a retried effect's event; settles the job as failed when it is not where the retry says."""
        assert job.located is not None
        found = await self._locate(job.located, job.effect_id)
        if job.dropped or self.stopping:
            return False
        if found is None:
            where = job.located
            await self._settle(job, FailEffect(
                effect_id=job.effect_id, generation=job.generation, provider=UNKNOWN_PROVIDER, attempts=0,
                code="retry_event_not_found",
                error=f"no event {job.effect_id} at partition {where.partition}, offset {where.offset} of the "
                      "events topic"))
            return False
        effect = self._registry.effect_of.get(found.event.type)
        job.trigger, job.effect, job.event_type = found, effect, found.event.type
        job.provider = effect.provider if effect else found.provider or UNKNOWN_PROVIDER
        job.correlation_id = found.event.correlation_id
        return True

    async def _without_handler(self, job: Job) -> None:
        """Hold the effect (and its partition's commit point) until another worker may take it, or it is undone."""
        log.error("no handler for %s on this worker: effect %s waits, and partition %d is not committed past "
                  "offset %d until a worker with the handler runs it", job.event_type, job.effect_id,
                  job.partition, job.offset, extra={**_fields(job), "provider": job.provider})
        self._report(job, EffectState.WAITING, WaitReason.NO_HANDLER,
                     f"worker {self._worker} has no handler for {job.event_type}")
        await job.wake.wait()
        if job.undone and not (job.dropped or self.stopping):  # cancelling needs no handler
            await self._cancel_undone(job)

    async def _attempts(self, job: Job, effect: Effect, trigger: Trigger) -> None:
        key = (job.tenant_id, effect.provider)
        last: Failed | None = None
        recheck_s = RECHECK_S
        while True:
            async with self._limits.place(job.tenant_id, effect.provider):
                turn = await self._turn(job, effect, trigger, key, last)
            if turn is _Stop.DROPPED:
                return
            if turn is _Stop.UNDONE:
                await self._cancel_undone(job)
                return
            if isinstance(turn, _Wait):
                self._waiting(job, turn.reason, turn.detail, last)
                await job.sleep(recheck_s)
                recheck_s = min(recheck_s * 1.5, LONGEST_RECHECK_S)
                continue
            recheck_s = RECHECK_S
            if isinstance(turn, Done):
                await self._settle(job, CompleteEffect(effect_id=job.effect_id, generation=job.generation,
                                                       provider=effect.provider, attempts=job.attempts,
                                                       result=turn.result))
                return
            if not turn.retryable or job.attempts >= effect.max_attempts:
                code, error = (turn.code, turn.error) if not turn.retryable else (
                    "attempts_exhausted", f"{job.attempts} attempts failed; the last: {turn.code}: {turn.error}")
                await self._settle(job, FailEffect(effect_id=job.effect_id, generation=job.generation,
                                                   provider=effect.provider, attempts=job.attempts, code=code,
                                                   error=error[:_ERROR_CHARS]))
                return
            last = turn
            delay = retry_delay(effect, job.attempts, self._rng)
            self.stats.retried += 1
            EFFECT_RETRIES.labels(effect.provider).inc()
            self._report(job, EffectState.WAITING, WaitReason.BACKOFF, f"{turn.code}: {turn.error}",
                         next_attempt_at=time.time() + delay)
            await job.sleep(delay)

    async def _turn(self, job: Job, effect: Effect, trigger: Trigger, key: BreakerKey,
                    last: Failed | None) -> Attempt | _Wait | _Stop:
        """With a place held: what stops the effect, what it waits on, or else one attempt's end."""
        if job.dropped or self.stopping:
            return _Stop.DROPPED
        if job.undone:
            return _Stop.UNDONE
        controls = self._controls.of(job.tenant_id)
        agent = trigger.event.actor.id
        if agent in controls.killed_agents:
            return _Wait(WaitReason.KILL_SWITCH, f"agent {agent} is switched off")
        if trigger.command_type in controls.killed_command_types:
            return _Wait(WaitReason.KILL_SWITCH, f"{trigger.command_type} is switched off")
        self._breakers.follow(key, effect.provider in controls.open_providers)
        admission = self._breakers.admit(key)
        if admission is Admission.WAIT:
            return _Wait(WaitReason.BREAKER, f"the breaker of provider {effect.provider} is open")
        return await self._attempt(job, effect, trigger, key, admission is Admission.PROBE, last)

    async def _attempt(self, job: Job, effect: Effect, trigger: Trigger, key: BreakerKey, probe: bool,
                       last: Failed | None) -> Attempt:
        job.attempts += 1
        job.waits_on = None
        self.stats.attempts += 1
        EFFECT_ATTEMPTS.labels(effect.provider).inc()
        self._report(job, EffectState.RUNNING, None, f"last error: {last.code}: {last.error}" if last else None)
        try:
            opened = self._opener(trigger.event)
        except Exception as exc:  # noqa: BLE001 - a key store that fails is not the provider's fault
            self._breakers.abandon(key)
            log.warning("cannot open the personal fields of %s: %s", job.effect_id, exc, extra=_fields(job))
            if isinstance(exc, KeelError):  # the data cannot be opened: asking again will not change that
                return Failed(exc.code, exc.message, retryable=False)
            return Failed("open_failed", f"{type(exc).__name__}: {exc}", retryable=True)
        call = EffectCall(event=opened, idempotency_key=idempotency_key(job.effect_id), attempt=job.attempts,
                          deadline=datetime.now(UTC) + timedelta(seconds=effect.timeout_s), provider=effect.provider)
        del opened  # plaintext lives in the call alone
        with self._busy(), attempt_span(job, effect.provider, trigger) as span:
            job.attempting = True
            try:
                outcome = await attempt(effect, call, self._pool)
            finally:
                job.attempting = False
            if span is not None:
                span.set_attribute("keel.effect.outcome", "done" if isinstance(outcome, Done) else outcome.code)
                if isinstance(outcome, Failed):
                    span.set_status(StatusCode.ERROR, f"{outcome.code}: {outcome.error}"[:500])
        answered = isinstance(outcome, Done) or outcome.answered
        transition = self._breakers.record(key, answered, probe=probe)
        if transition is not None:
            self._announce(job, effect.provider, transition, outcome)
        return outcome

    def _announce(self, job: Job, provider: str, transition: Transition, outcome: Attempt) -> None:
        """Tell every worker, through the processor and the controls topic, that a breaker opened or closed."""
        payload: Payload
        if transition is Transition.OPENED:
            assert isinstance(outcome, Failed)  # only a failure opens a breaker
            reason = (f"{self._breakers.threshold} attempts in a row failed; the last: {outcome.code}: "
                      f"{outcome.error}")[:_REASON_CHARS]
            payload = OpenProviderBreaker(provider=provider, reason=reason)
        else:
            reason = f"a probe attempt (effect {job.effect_id}) succeeded"
            payload = CloseProviderBreaker(provider=provider, reason=reason)
        log.warning("the breaker of provider %s of tenant %s %s: %s", provider, job.tenant_id, transition.value,
                    reason, extra={**_fields(job), "provider": provider})
        sent = self._sender.command(new_command(payload, tenant_id=job.tenant_id, aggregate_id=CONTROLS_AGGREGATE,
                                                actor=EFFECTS_ACTOR, causation_id=job.effect_id,
                                                correlation_id=job.correlation_id))
        sent.add_done_callback(_log_undelivered)

    async def _cancel_undone(self, job: Job) -> None:
        await self._settle(job, CancelEffect(
            effect_id=job.effect_id, code="undone",
            reason=f"command {job.origin_command_id} was undone before its effect was performed"))

    async def _settle(self, job: Job, payload: CompleteEffect | FailEffect | CancelEffect) -> None:
        """Send the outcome and wait until Kafka has it (trying again while the worker runs)."""
        command = new_command(payload, tenant_id=job.tenant_id, aggregate_id=job.aggregate_id, actor=EFFECTS_ACTOR,
                              command_id=outcome_command_id(job.effect_id, job.generation),
                              causation_id=job.effect_id, correlation_id=job.correlation_id,
                              traceparent=job.traceparent or (job.trigger.event.traceparent if job.trigger else None))
        with self._busy():
            while True:
                try:
                    await self._sender.command(command)
                    break
                except DeliveryError as exc:
                    log.error("%s; sending it again", exc.message, extra=_fields(job))
                    if self.stopping:
                        return
                    await asyncio.sleep(RESEND_AFTER_S)
        job.settled = True
        match payload:
            case CompleteEffect():
                self.stats.succeeded += 1
                outcome = "succeeded"
            case FailEffect():
                self.stats.failed += 1
                outcome = "failed"
            case CancelEffect():
                self.stats.cancelled += 1
                outcome = "cancelled"
        EFFECT_OUTCOMES.labels(tenant_label(job.tenant_id), job.provider, outcome).inc()

    def _waiting(self, job: Job, reason: WaitReason, detail: str, last: Failed | None) -> None:
        """Report a wait, once while it stays the same."""
        if last is not None:
            detail = f"{detail}; last error: {last.code}: {last.error}"
        if job.waits_on != detail:
            job.waits_on = detail
            self._report(job, EffectState.WAITING, reason, detail)

    def _report(self, job: Job, state: EffectState, reason: WaitReason | None, detail: str | None, *,
                next_attempt_at: float | None = None) -> None:
        self._sender.report(EffectReport(
            tenant_id=job.tenant_id, effect_id=job.effect_id, origin_command_id=job.origin_command_id,
            aggregate_id=job.aggregate_id, event_type=job.event_type, provider=job.provider,
            generation=job.generation, seq=job.next_seq(), state=state, reason=reason,
            detail=detail[:_DETAIL_CHARS] if detail else None, attempts=job.attempts,
            next_attempt_at=next_attempt_at, at=time.time(), worker=self._worker))

    @contextmanager
    def _busy(self) -> Iterator[None]:
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


def _fields(job: Job) -> dict[str, str | None]:
    """The ``extra=`` of a log line about one effect: its tenant, command, effect and trace."""
    trace = job.traceparent or (job.trigger.event.traceparent if job.trigger else None)
    return {"tenant_id": job.tenant_id, "command_id": str(job.origin_command_id), "effect_id": str(job.effect_id),
            "trace_id": tracing.trace_id_of(trace)}


def _log_undelivered(sent: asyncio.Future[None]) -> None:
    if not sent.cancelled() and (error := sent.exception()) is not None:
        log.error("a breaker command was not delivered: %s", error)
