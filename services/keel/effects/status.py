"""An effect's state in the status store, folded from its event, worker reports and outcome events.

The tracker reads these records from two topics in no guaranteed order, and reads them
again after a crash, so the fold orders them itself: each change has a position
``(generation, stage, seq)`` and a row only takes a change from a later position. Within a
generation the opening comes first (the effect's event, or the ``EffectRetried`` that starts
the generation), then the worker's reports by ``seq``, then the outcome event; any record
of a later generation outranks every record of an earlier one. What the effect is (its
event's type, provider, origin command, place in the log) is not state: it is filled in
from whichever record brings it, whatever that record's position.
"""

from __future__ import annotations

import uuid
from enum import IntEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.domain.envelope import Envelope
from keel.domain.events import EffectCancelled, EffectFailed, EffectRetried, EffectSucceeded
from keel.effects.progress import EffectReport, EffectState, WaitReason


class Stage(IntEnum):
    """Where in its generation a record stands."""

    OPENED = 0
    REPORTED = 1
    SETTLED = 2


class EffectFacts(BaseModel):
    """What an effect is: records bring some of it each, and none changes it."""

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    effect_id: uuid.UUID = Field(description="The id of the event the effect carries out.")
    aggregate_id: str
    origin_command_id: uuid.UUID | None = Field(default=None, description="The command whose event it is.")
    event_type: str | None = None
    provider: str | None = None
    event_partition: int | None = Field(default=None, description="Where the event is in the events topic.")
    event_offset: int | None = None


class EffectProgress(EffectFacts):
    """An effect's state at a position of the fold."""

    generation: int = Field(description="0, and one more after each retry.")
    stage: Stage = Field(description="0 opened, 1 reported by a worker, 2 settled by an outcome event.")
    seq: int = Field(default=0, description="Orders a worker's reports within a generation.")
    state: EffectState
    reason: WaitReason | None = None
    detail: str | None = Field(default=None, description="The last error, what it waits on, or why it was retried.")
    next_attempt_at: float | None = Field(default=None, description="Unix time of the next attempt, in backoff.")
    result: str | None = Field(default=None, description="The handler's JSON result, once succeeded.")
    error_code: str | None = Field(default=None, description="Why it failed or was cancelled.")
    error: str | None = None

    @property
    def position(self) -> tuple[int, int, int]:
        return self.generation, self.stage, self.seq


class EffectChange(EffectProgress):
    """What one record says about one effect."""

    attempts: int | None = Field(default=None, description="None: the record does not say (a cancellation).")


class EffectRecord(EffectProgress):
    """An effect as the status store keeps it, and as ``GET /v1/commands/{id}`` and ``keel effects`` show it."""

    attempts: int = 0
    updated_at: float


_FACTS = tuple(EffectFacts.model_fields)
_PROGRESS = tuple(name for name in EffectProgress.model_fields if name not in _FACTS)


def fold(row: EffectRecord | None, change: EffectChange, now: float) -> EffectRecord | None:
    """``row`` after ``change``; None when the change tells nothing new (a replay, an outranked record)."""
    if row is None:
        return EffectRecord.model_validate(new_row(change, now))
    values = row.model_dump()
    values.update({name: getattr(change, name) for name in _FACTS if values[name] is None})
    if change.position > row.position:
        values.update({name: getattr(change, name) for name in _PROGRESS})
        if change.attempts is not None:
            values["attempts"] = change.attempts
    folded = EffectRecord(**values)
    return None if folded == row else folded.model_copy(update={"updated_at": now})


def new_row(change: EffectChange, now: float) -> dict[str, Any]:
    """The row ``fold(None, change, now)`` makes, as its columns hold it (``model_dump(mode="json")``),
    without building and dumping the record: a new effect's first change is the tracker's usual
    fold, and the record's validation and dump were four fifths of it (measured: 21 against 4 µs)."""
    values = change.model_dump(mode="json")
    values["attempts"] = change.attempts or 0
    values["updated_at"] = now
    return values


def from_report(report: EffectReport) -> EffectChange:
    """A worker's report of what an effect is doing."""
    return EffectChange(**report.model_dump(exclude={"at", "worker"}), stage=Stage.REPORTED)


def from_event(event: Envelope, *, partition: int | None, offset: int | None,
               provider: str | None) -> EffectChange | None:
    """What ``event`` (at ``partition``/``offset`` of the events topic) says about an effect, if anything.

    ``provider`` is given when the event's type has an effect: the event opens it, pending.
    Outcome events settle their generation; ``EffectRetried`` opens the next one.
    """
    match event.payload:
        case EffectSucceeded() as done:
            return _change(event, done, stage=Stage.SETTLED, state=EffectState.SUCCEEDED, provider=done.provider,
                           attempts=done.attempts, result=done.result)
        case EffectFailed() as failed:
            return _change(event, failed, stage=Stage.SETTLED, state=EffectState.FAILED, provider=failed.provider,
                           attempts=failed.attempts, error_code=failed.code, error=failed.error)
        case EffectCancelled() as cancelled:
            return _change(event, cancelled, stage=Stage.SETTLED, state=EffectState.CANCELLED,
                           error_code=cancelled.code, error=cancelled.reason)
        case EffectRetried() as retried:
            return _change(event, retried, stage=Stage.OPENED, state=EffectState.PENDING, attempts=0,
                           detail=f"retried: {retried.reason}", event_partition=retried.event_partition,
                           event_offset=retried.event_offset)
    return opened(tenant_id=event.tenant_id, aggregate_id=event.aggregate_id, event_id=event.id,
                  causation_id=event.causation_id, event_type=event.type, provider=provider,
                  partition=partition, offset=offset)


def opened(*, tenant_id: str, aggregate_id: str, event_id: uuid.UUID, causation_id: uuid.UUID | None,
           event_type: str, provider: str | None, partition: int | None, offset: int | None) -> EffectChange | None:
    """The effect an event of ``event_type`` opens, pending, when its type has one (``provider``)."""
    if provider is None or causation_id is None:  # the processor opens effects of caused events only
        return None
    return EffectChange(tenant_id=tenant_id, aggregate_id=aggregate_id, effect_id=event_id,
                        origin_command_id=causation_id, event_type=event_type, provider=provider,
                        event_partition=partition, event_offset=offset, generation=0, stage=Stage.OPENED,
                        state=EffectState.PENDING, attempts=0)


def _change(event: Envelope, outcome: EffectSucceeded | EffectFailed | EffectCancelled | EffectRetried,
            **fields: Any) -> EffectChange:
    return EffectChange(tenant_id=event.tenant_id, aggregate_id=event.aggregate_id, effect_id=outcome.effect_id,
                        origin_command_id=outcome.origin_command_id, generation=outcome.generation, **fields)
