"""One effect a worker owes: where its record is, what it carries out, and what befell it meanwhile."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from keel.domain.envelope import Envelope
from keel.domains.model import Effect
from keel.effects.offsets import PartitionOffsets

UNKNOWN_PROVIDER = "unknown"
"""The provider named in an outcome when the effect's event could not be read (a retry's)."""


@dataclass(frozen=True)
class Trigger:
    """The recorded event an effect carries out, with what its record's headers say."""

    event: Envelope
    """As decoded: personal fields still sealed (they are opened for each call only)."""
    command_type: str | None
    """The type of the command the event is about (its kill switch stops the effect)."""
    provider: str | None
    """The provider the processor's registry names for the event's type (the ``keel-effect`` header)."""
    traceparent: str | None = None
    """The span that produced the event (its record's ``traceparent`` header), when traced."""


@dataclass(frozen=True)
class Located:
    """Where the event of a retried effect is: it is read from there when the effect comes up."""

    partition: int
    offset: int


@dataclass(eq=False)
class Job:
    """One generation of one effect, held at ``offset`` of its partition until its outcome is recorded."""

    offsets: PartitionOffsets
    """The partition's offsets as they were when the job was read (a partition that comes back is new)."""
    partition: int
    offset: int
    tenant_id: str
    aggregate_id: str
    effect_id: uuid.UUID
    origin_command_id: uuid.UUID
    correlation_id: uuid.UUID
    generation: int
    event_type: str
    provider: str
    effect: Effect | None
    """This worker's handler for the event's type; ``None`` when it has none."""
    trigger: Trigger | None = None
    """The event, once known: a retried effect's is read when the job comes up."""
    located: Located | None = None
    attempts: int = 0
    undone: bool = False
    """A compensating event named the effect's command: it must not start again."""
    dropped: bool = False
    """Its partition went to another worker, or its outcome is recorded: it ends without (another) one."""
    settled: bool = False
    """Its outcome is recorded (sent and acknowledged, or seen on the events topic)."""
    attempting: bool = False
    seq: int = 0
    waits_on: str | None = None
    """What the last report said it waits on, so that an unchanged wait is reported once."""
    traceparent: str | None = None
    """The last attempt's span: the outcome command continues its trace."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> str:
        return f"{self.tenant_id}/{self.aggregate_id}"

    def next_seq(self) -> int:
        """The next report's seq: microseconds since the epoch, so reports of any worker order in time."""
        self.seq = max(self.seq + 1, time.time_ns() // 1000)
        return self.seq

    def interrupt(self, *, undone: bool = False) -> None:
        """Mark the job undone (or else dropped) and wake it if it waits; both are for good."""
        if undone:
            self.undone = True
        else:
            self.dropped = True
        self.wake.set()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the job is interrupted."""
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except TimeoutError:
            return
