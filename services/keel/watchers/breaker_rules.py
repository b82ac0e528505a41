"""Pure rules of the breaker watcher: what an event signals, how a window adds up, when to trip.

No faust and no Kafka here, so the rules are unit-tested in isolation.

- A *decision* is the first event of a command (``event_id(causation_id, 0)``) whose actor
  is an agent; it is a *rejection* when that event is ``CommandRejected``.
- ``BreakerTripped`` / ``BreakerReset`` (payload ``agent_id``) open and close the breaker
  as the processor recorded it. A reset starts a new *epoch* (the reset event's id): the
  window's counts start again from zero, so the rejections the open breaker caused do not
  trip it straight back, and a second trip in the same window gets a new command id.
- A window trips once: when it holds at least ``min_decisions`` decisions, the rejected
  share is at least ``threshold``, the breaker is not already open, and no trip was sent
  for this window and epoch. This is checked at every decision as it arrives, so a burst
  of rejections early in a window trips it even if the window's final share is lower (and
  arrival order across the events partitions is not the order the commands were decided).
  Windows that ended more than ``stale_after_s`` ago never trip (a new consumer group
  replaying old history must not halt agents for the past).
- Signals carry their source partition and offset; a window remembers the highest offset
  counted per source partition, so a redelivered signal (faust is at-least-once) is
  recognised and not counted twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from keel.domain.commands import TripBreaker
from keel.domain.envelope import Actor, ActorKind, Authority, Envelope, new_command
from keel.domain.events import BreakerReset, BreakerTripped
from keel.domain.outcomes import event_id

WATCHER_ACTOR = Actor(kind=ActorKind.SERVICE, id="keel-breaker-watcher")
SYSTEM_AUTHORITY = Authority(role="system")
CONTROLS_AGGREGATE = "controls"
REJECTED_TYPE = "CommandRejected"
_NAMESPACE = uuid.UUID("0b6a3f2e-5c1d-5e7a-8f4b-2d9c6e1a7b30")
_SEPARATOR = "/"  # tenant and actor ids never contain '/'


class BreakerSettings(BaseSettings):
    """When the breaker watcher trips an agent, from ``KEEL_BREAKER_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="KEEL_BREAKER_", frozen=True)

    window_s: float = Field(default=60.0, gt=0, description="Length of the tumbling window.")
    min_decisions: int = Field(default=20, ge=1,
                               description="Decisions a window needs before it can trip.")
    threshold: float = Field(default=0.5, gt=0, le=1,
                             description="Rejected share of decisions that trips the breaker.")
    stale_after_s: float = Field(default=300.0, ge=0,
                                 description="Windows that ended longer ago than this never trip.")


class SignalKind(StrEnum):
    """What an event tells the breaker watcher."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    TRIPPED = "tripped"
    RESET = "reset"


@dataclass(frozen=True)
class Signal:
    """One event, reduced to what the breaker needs; forwarded keyed by ``tenant/agent``."""

    kind: SignalKind
    tenant: str
    agent: str
    partition: int  # of the events topic
    offset: int
    event_id: str

    @property
    def key(self) -> str:
        """The key that keeps one agent's signals on one partition."""
        return agent_key(self.tenant, self.agent)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signal:
        return cls(kind=SignalKind(data["kind"]), tenant=str(data["tenant"]),
                   agent=str(data["agent"]), partition=int(data["partition"]),
                   offset=int(data["offset"]), event_id=str(data["event_id"]))


def agent_key(tenant: str, agent: str) -> str:
    """The table key of one agent of one tenant."""
    return f"{tenant}{_SEPARATOR}{agent}"


def signal_of(event: Envelope, partition: int, offset: int) -> Signal | None:
    """What ``event`` (read at ``partition``/``offset``) signals, or ``None`` for nothing."""
    payload = event.payload
    if isinstance(payload, (BreakerTripped, BreakerReset)):
        kind = SignalKind.TRIPPED if isinstance(payload, BreakerTripped) else SignalKind.RESET
        return Signal(kind, event.tenant_id, payload.agent_id, partition, offset, str(event.id))
    if event.actor.kind is not ActorKind.AGENT:
        return None
    if event.causation_id is None or event.id != event_id(event.causation_id, 0):
        return None  # a later event of a command, not its decision
    kind = SignalKind.REJECTED if event.type == REJECTED_TYPE else SignalKind.ACCEPTED
    return Signal(kind, event.tenant_id, event.actor.id, partition, offset, str(event.id))


@dataclass(frozen=True)
class BreakerState:
    """The breaker of one agent as the events tell it: open or not, and the last reset."""

    tripped: bool = False
    epoch: str = ""  # id of the last BreakerReset event seen ("" before any)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> BreakerState:
        if not data:
            return cls()
        return cls(tripped=bool(data.get("tripped", False)), epoch=str(data.get("epoch", "")))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, signal: Signal) -> BreakerState:
        """The state after a ``TRIPPED`` or ``RESET`` signal (others leave it as is)."""
        if signal.kind is SignalKind.TRIPPED:
            return replace(self, tripped=True)
        if signal.kind is SignalKind.RESET:
            return BreakerState(tripped=False, epoch=signal.event_id)
        return self


@dataclass(frozen=True)
class WindowCounts:
    """Decisions of one agent in one window and epoch, and the offsets counted per partition."""

    decisions: int = 0
    rejections: int = 0
    epoch: str = ""
    sent: bool = False
    offsets: dict[str, int] = field(default_factory=dict)  # source partition -> highest offset

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> WindowCounts:
        if not data:
            return cls()
        return cls(decisions=int(data.get("decisions", 0)), rejections=int(data.get("rejections", 0)),
                   epoch=str(data.get("epoch", "")), sent=bool(data.get("sent", False)),
                   offsets={str(k): int(v) for k, v in dict(data.get("offsets", {})).items()})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, signal: Signal, epoch: str) -> WindowCounts | None:
        """These counts plus a decision ``signal`` in ``epoch``; ``None`` if already counted."""
        if signal.kind not in (SignalKind.ACCEPTED, SignalKind.REJECTED):
            raise ValueError(f"a {signal.kind.value} signal is not a decision")
        partition = str(signal.partition)
        if signal.offset <= self.offsets.get(partition, -1):
            return None
        offsets = {**self.offsets, partition: signal.offset}
        base = self if self.epoch == epoch else WindowCounts(epoch=epoch)
        rejected = signal.kind is SignalKind.REJECTED
        return replace(base, decisions=base.decisions + 1,
                       rejections=base.rejections + int(rejected), offsets=offsets)

    def mark_sent(self) -> WindowCounts:
        return replace(self, sent=True)


def window_start(timestamp: float, size_s: float) -> float:
    """Start of the tumbling window holding ``timestamp`` (faust's own arithmetic)."""
    return (timestamp // size_s) * size_s


def should_trip(counts: WindowCounts, breaker: BreakerState, rules: BreakerSettings, *,
                start: float, now: float) -> bool:
    """Whether this window's counts trip the agent's breaker now."""
    if breaker.tripped or counts.sent or counts.epoch != breaker.epoch:
        return False
    if start + rules.window_s + rules.stale_after_s < now:
        return False
    return (counts.decisions >= rules.min_decisions
            and counts.rejections >= rules.threshold * counts.decisions)


def trip_command_id(tenant: str, agent: str, start: float, epoch: str) -> uuid.UUID:
    """The deterministic id of the trip of ``agent`` in the window at ``start`` and ``epoch``."""
    return uuid.uuid5(_NAMESPACE, _SEPARATOR.join((tenant, agent, str(int(start)), epoch)))


def trip_command(tenant: str, agent: str, counts: WindowCounts, rules: BreakerSettings, *,
                 start: float, now: datetime | None = None) -> Envelope:
    """The ``TripBreaker`` command for ``agent``, sent by the watcher as a system actor."""
    began = datetime.fromtimestamp(start, UTC).isoformat()
    reason = (f"{counts.rejections} of {counts.decisions} decisions rejected in the "
              f"{rules.window_s:g}s window from {began} (threshold {rules.threshold:.0%}, "
              f"at least {rules.min_decisions} decisions)")
    return new_command(TripBreaker(agent_id=agent, reason=reason), tenant_id=tenant,
                       aggregate_id=CONTROLS_AGGREGATE, actor=WATCHER_ACTOR,
                       authority=SYSTEM_AUTHORITY,
                       command_id=trip_command_id(tenant, agent, start, counts.epoch),
                       occurred_at=now)
