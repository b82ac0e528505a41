"""What a team declares to bring its own domain: aggregates, their types, and undo.

A domain is plain data around pure functions. Keel's core never imports a team's
package by name: it finds the ``Domain`` object through the ``keel.domains`` entry point
group or ``KEEL_DOMAINS`` (``keel.domains.registry``), and every service (processor,
gateway, replay, undo, audit, erasure) works from what the object declares.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from keel.domain.envelope import Envelope
from keel.domain.governance.policy import Rule
from keel.domain.payloads import Command, Event

S = TypeVar("S")


class Rejected(Exception):
    """Raised by ``decide`` to refuse a command; Keel records it as a ``CommandRejected`` event.

    ``code`` is machine-readable (snake_case), ``reason`` is for people.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"[{code}] {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Aggregate(Generic[S]):
    """One kind of thing commands act on, e.g. a subscription or a deployment.

    ``decide(state, command)`` returns the events a command yields (or raises ``Rejected``);
    ``evolve(state, event)`` returns the state after an event. Both are pure: the processor,
    replay and point-in-time state fold with the same ``evolve``, so they never drift.
    ``command`` and ``event`` are envelopes: ``.payload`` is the typed model, and
    ``.aggregate_id``, ``.causation_id`` and ``.actor`` say where it came from.
    """

    name: str
    initial: S
    commands: tuple[type[Command], ...]
    events: tuple[type[Event], ...]
    decide: Callable[[S, Envelope], Sequence[Event]]
    evolve: Callable[[S, Envelope], S]
    id_pattern: str = r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}"
    """The aggregate ids a command may address (a full match); others are refused."""


@dataclass(frozen=True)
class Undo:
    """How an event is undone: a compensation, never an edit of the record.

    ``keel undo COMMAND`` finds the command's events and, for the last one that has an
    ``Undo``, sends ``command(event, reason)`` to the same aggregate, caused by the undone
    command. ``by`` is the event the compensation yields when it runs.
    """

    by: type[Event]
    command: Callable[[Envelope, str], Command]
    names_undone: str | None = None
    """The field of ``by`` that holds the undone command's id, if it has one: the
    compensating command's status then names the command it undid."""


class RetryableError(Exception):
    """Raised by an effect handler when the call may succeed later (a 5xx, a timeout, a reset).

    Keel retries with backoff under the same idempotency key, up to the effect's
    ``max_attempts``; repeated retryable errors of one provider open its breaker.
    """


class PermanentError(Exception):
    """Raised by an effect handler when retrying cannot help (a 4xx, a declined card).

    The effect is recorded as failed at once with ``code`` and the message; ``keel effects
    retry`` runs it again when a person decides it should.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class EffectCall:
    """What an effect handler gets for one attempt.

    ``event`` is the decided event with its personal fields opened for this call only.
    ``idempotency_key`` is the same for every attempt of the effect, on every worker, after
    any crash: pass it to the provider (an ``Idempotency-Key`` header) so that it performs
    the action once however often it is asked. ``deadline`` is when Keel stops waiting for
    this attempt (the handler should give up by then).
    """

    event: Envelope
    idempotency_key: str
    attempt: int
    deadline: datetime
    provider: str


EffectResult = dict[str, Any] | None
"""What a handler returns on success: a JSON object Keel records in ``EffectSucceeded``."""

EffectHandler = Callable[[EffectCall], EffectResult | Awaitable[EffectResult]]


@dataclass(frozen=True)
class Effect:
    """What carries an event into the outside world: a payment, an e-mail, a deploy.

    When ``on`` is recorded, ``keel effects run`` calls ``handler`` (sync or async) with an
    ``EffectCall``. The outcome goes back through the processor as ``EffectSucceeded`` or
    ``EffectFailed`` on the event's aggregate. ``provider`` names the outside system: effects
    of one tenant and provider share a concurrency limit and a circuit breaker.
    """

    on: type[Event]
    handler: EffectHandler
    provider: str
    timeout_s: float = 10.0
    """How long one attempt may take before it counts as a retryable timeout."""
    max_attempts: int = 8
    backoff_s: float = 0.5
    """The first retry's delay; each later one doubles it (with jitter), up to ``max_backoff_s``."""
    max_backoff_s: float = 30.0


@dataclass(frozen=True)
class Domain:
    """A team's domain: its aggregates, what undoes what, and its default policy rules."""

    name: str
    home: Path
    """The package folder: ``schemas/`` (``keel schemas freeze`` writes there) and, if it
    has one, ``projections/`` (numbered ClickHouse views over Keel's tables)."""
    aggregates: tuple[Aggregate[Any], ...]
    undo: dict[type[Event], Undo] = field(default_factory=dict)
    policy: tuple[Rule, ...] = ()
    """Rules of the built-in policy a tenant has until it publishes its own."""
    views: tuple[str, ...] = ()
    """The views ``projections/`` creates; analysts query them scoped to their tenant."""
    upcasters: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = field(default_factory=dict)
    """(type name, version) -> a function turning a payload of that version into the next
    version's shape: how an event type that changed incompatibly still reads its old records."""
    demo: Callable[[], None] | None = None
    """A story ``keel demo`` plays on the local broker, if the domain has one."""
    schema_namespace: str | None = None
    """The Avro namespace of the domain's records (default: the domain's name)."""
    effects: tuple[Effect, ...] = ()
    """What carries the domain's events into the outside world (at most one per event type)."""

    @property
    def schemas(self) -> Path:
        return self.home / "schemas"

    @property
    def projections(self) -> Path:
        return self.home / "projections"

    @property
    def namespace(self) -> str:
        return self.schema_namespace or self.name

    @property
    def commands(self) -> tuple[type[Command], ...]:
        return tuple(c for aggregate in self.aggregates for c in aggregate.commands)

    @property
    def events(self) -> tuple[type[Event], ...]:
        return tuple(e for aggregate in self.aggregates for e in aggregate.events)
