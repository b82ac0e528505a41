"""Given/when/then for a domain's ``decide`` and ``evolve``, through Keel's own side of them.

A scenario decides each command with ``keel.domain.deciding.decide`` and folds each event
with ``evolve_aggregate``, the functions the processor, replay and ``keel state`` use: a
test sees the versions, the expected-version check, the aggregate-id check and the
``CommandRejected`` that ``Rejected`` becomes, exactly as production will. Governance
(roles, policy, approvals) is not applied here; ``keel.testing.pipeline`` runs the real
processor for that.

Scenarios are immutable: every step returns a new one, so one ``given`` can branch into
several ``when``s.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import BaseModel

from keel.domain.aggregate import EMPTY, AggregateState, evolve_aggregate
from keel.domain.deciding import decide
from keel.domain.envelope import Actor, ActorKind, Envelope, Payload, new_command
from keel.domain.events import CommandRejected
from keel.domain.outcomes import event_id, to_events
from keel.domain.payloads import Command, Event
from keel.domains.model import Domain
from keel.domains.registry import Registry, build, current

S = TypeVar("S")

TENANT = "tenant-1"
ACTOR = "agent:agent-1"
AGGREGATE = "aggregate-1"


def parse_actor(spec: str) -> Actor:
    """``kind:id`` (``agent:support-bot``, ``human:jane.lead``) as an ``Actor``, as the CLI's ``--as`` reads it."""
    kind, sep, actor_id = spec.partition(":")
    kinds = ", ".join(k.value for k in ActorKind)
    if not sep or kind not in {k.value for k in ActorKind}:
        raise ValueError(f"actor {spec!r} is not kind:id with kind one of {kinds}")
    return Actor(kind=ActorKind(kind), id=actor_id)


@dataclass(frozen=True)
class Decided:
    """One command and the events Keel decided for it (a rejection is one ``CommandRejected``)."""

    command: Envelope
    events: tuple[Envelope, ...]

    @property
    def payloads(self) -> list[Payload]:
        """The events' payloads, for equality checks."""
        return [e.payload for e in self.events]

    @property
    def rejection(self) -> CommandRejected | None:
        """The refusal, if the command was refused."""
        return next((e.payload for e in self.events if isinstance(e.payload, CommandRejected)), None)

    def describe(self) -> str:
        """``GrantPoints on tenant/aggregate``: how assertion messages name the command."""
        return f"{self.command.type} on {self.command.key}"


def show(payloads: Sequence[Payload]) -> str:
    """Payloads one per line, as ``Type(field=value, ...)``."""
    return "\n".join(f"    {p!r}" for p in payloads) or "    (no events)"


def differences(expected: BaseModel, actual: BaseModel) -> list[str]:
    """``Type.field: expected X, got Y`` for each field two models of one type disagree on."""
    name = type(expected).__name__
    fields = type(expected).model_fields
    return [f"{name}.{f}: expected {getattr(expected, f)!r}, got {getattr(actual, f)!r}"
            for f in fields if getattr(expected, f) != getattr(actual, f)]


@dataclass(frozen=True)
class Scenario:
    """A domain's aggregates after some history, and the last command decided against them."""

    domain: Domain
    registry: Registry
    """Whose aggregates decide and fold: the process's when the domain is registered, else its own."""
    tenant: str = TENANT
    actor: str = ACTOR
    aggregate: str = AGGREGATE
    """The aggregate the next step addresses unless it names another."""
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    states: Mapping[str, AggregateState] = field(default_factory=dict)
    history: tuple[Envelope, ...] = ()
    """Every event so far, given or decided, in order."""
    last: Decided | None = None

    # -- steps ---------------------------------------------------------------------------

    def given(self, *messages: Command | Event, aggregate: str | None = None, actor: str | None = None,
              on_behalf_of: str | None = None) -> Scenario:
        """History: each command is decided (it must be accepted), each event is folded as if decided."""
        step = replace(self, aggregate=aggregate or self.aggregate)
        for message in messages:
            if isinstance(message, Command):
                step = step._decide(message, actor=actor, on_behalf_of=on_behalf_of)
                assert step.last is not None
                refusal = step.last.rejection
                if refusal is not None:
                    raise AssertionError(f"given: {step.last.describe()} was rejected [{refusal.code}] "
                                         f"{refusal.reason}; a given command must be accepted")
            else:
                step = step._fold_given(message, actor=actor, on_behalf_of=on_behalf_of)
        return replace(step, last=None)

    def when(self, command: Command, *, aggregate: str | None = None, actor: str | None = None,
             on_behalf_of: str | None = None, expected_version: int | None = None,
             command_id: uuid.UUID | None = None) -> Scenario:
        """Decide ``command`` (as ``actor``, default the scenario's) and fold what it yields."""
        step = replace(self, aggregate=aggregate or self.aggregate)
        return step._decide(command, actor=actor, on_behalf_of=on_behalf_of, expected_version=expected_version,
                            command_id=command_id)

    def then(self, *expected: Event) -> Scenario:
        """Assert the last command was accepted and yielded exactly ``expected`` (equal payloads, in order)."""
        decided = self.decided
        actual = decided.payloads
        refusal = decided.rejection
        if refusal is not None:
            raise AssertionError(f"then: {decided.describe()} was rejected [{refusal.code}] {refusal.reason}\n"
                                 f"  expected:\n{show(expected)}")
        if actual != list(expected):
            lines = [f"then: {decided.describe()} yielded other events than expected",
                     f"  expected:\n{show(expected)}", f"  actual:\n{show(actual)}"]
            if len(actual) == len(expected):
                lines += [f"  {line}" for want, got in zip(expected, actual, strict=True)
                          if type(want) is type(got) for line in differences(want, got)]
            raise AssertionError("\n".join(lines))
        return self

    def then_rejected(self, code: str) -> Scenario:
        """Assert the last command was refused with ``code`` (the domain's or one of Keel's checks)."""
        decided = self.decided
        refusal = decided.rejection
        if refusal is None:
            raise AssertionError(f"then_rejected: {decided.describe()} was accepted, expected [{code}]\n"
                                 f"  actual:\n{show(decided.payloads)}")
        if refusal.code != code:
            raise AssertionError(f"then_rejected: {decided.describe()} was rejected [{refusal.code}] "
                                 f"{refusal.reason}\n  expected code: {code}")
        return self

    # -- what the scenario shows ---------------------------------------------------------

    @property
    def decided(self) -> Decided:
        """The last ``when``: its command envelope and the event envelopes Keel made of it."""
        if self.last is None:
            raise AssertionError("nothing was decided yet: call when(command) before then(...)")
        return self.last

    @property
    def version(self) -> int:
        """The addressed aggregate's version (0 before its first event)."""
        return self.states.get(self.aggregate, EMPTY).version

    def state(self, kind: type[S]) -> S:
        """The addressed aggregate's domain state, checked to be a ``kind`` (its initial one before any event)."""
        held = self.states.get(self.aggregate, EMPTY).domain
        if held is None:
            held = next((a.initial for a in self.domain.aggregates if isinstance(a.initial, kind)), None)
        if not isinstance(held, kind):
            raise AssertionError(f"{self.tenant}/{self.aggregate} holds a {type(held).__name__}, "
                                 f"not a {kind.__name__}")
        return held

    # -- Keel's side -----------------------------------------------------------------------

    def _decide(self, command: Command, *, actor: str | None, on_behalf_of: str | None,
                expected_version: int | None = None, command_id: uuid.UUID | None = None) -> Scenario:
        envelope = new_command(command, tenant_id=self.tenant, aggregate_id=self.aggregate,
                               actor=parse_actor(actor or self.actor), on_behalf_of=on_behalf_of,
                               expected_version=expected_version, command_id=command_id, occurred_at=self.now)
        state = self.states.get(self.aggregate, EMPTY)
        events = to_events(envelope, decide(envelope, state, self.registry), version=state.version, now=self.now)
        return self._fold(events, last=Decided(envelope, tuple(events)))

    def _fold_given(self, event: Event, *, actor: str | None, on_behalf_of: str | None) -> Scenario:
        """``event`` as the only event of a command of its own, at the aggregate's next version."""
        if type(event).__name__ not in self.registry.aggregate_of:
            raise ValueError(f"given: {type(event).__name__} is no event of a registered aggregate; "
                             "Keel's own events (approvals, rejections) come from commands")
        cause = uuid.uuid4()
        state = self.states.get(self.aggregate, EMPTY)
        envelope = Envelope(id=event_id(cause, 0), tenant_id=self.tenant, actor=parse_actor(actor or self.actor),
                            on_behalf_of=on_behalf_of, type=type(event).__name__,
                            schema_version=event.schema_version, aggregate_id=self.aggregate,
                            version=state.version + 1, causation_id=cause, correlation_id=cause,
                            occurred_at=self.now, payload=event)
        return self._fold([envelope], last=None)

    def _fold(self, events: list[Envelope], *, last: Decided | None) -> Scenario:
        state = self.states.get(self.aggregate, EMPTY)
        for event in events:
            state = evolve_aggregate(state, event, self.registry)
        return replace(self, states={**self.states, self.aggregate: state}, history=(*self.history, *events),
                       last=last)


def scenario(domain: Domain, *, tenant: str = TENANT, actor: str = ACTOR, aggregate: str = AGGREGATE,
             now: datetime | None = None) -> Scenario:
    """An empty history of ``domain``: registered or not, so a domain can be tested before its
    package is installed or its schemas frozen.

    ``actor`` (``kind:id``) acts unless a step names another; ``now`` stamps every envelope.
    """
    parse_actor(actor)  # a malformed actor fails here, not at the first step
    registered = current()
    registry = registered if any(d is domain for d in registered.domains) else build([domain], check_schemas=False)
    return Scenario(domain=domain, registry=registry, tenant=tenant, actor=actor, aggregate=aggregate,
                    now=now or datetime.now(UTC))
