"""When a wait on a command ends: the pure half of ``wait``, shared by the sync and async clients.

A wait follows the command's server-sent records (``GET /v1/commands/{id}/stream``) and
ends at the state asked for (``until``), or, when none is asked, once the command is
*settled*: done (``summary.done``), or waiting on someone (an approver, a kill switch, an
open breaker, a worker that can run its effect), which waiting longer would not change.
"""

from __future__ import annotations

import time
import uuid

from keel.client.errors import EndedOtherwise, WaitTimedOut
from keel.effects.progress import EffectState, WaitReason
from keel.errors import ValidationError
from keel.outbox.models import TERMINAL, CommandRecord, CommandStatus

MAX_STREAM_S = 600.0
"""The longest stream the gateway serves; longer waits reconnect."""

NEEDS_SOMEONE = frozenset({WaitReason.APPROVAL, WaitReason.KILL_SWITCH, WaitReason.BREAKER, WaitReason.NO_HANDLER})
"""Waits that end only when a person or a provider acts (a backoff ends by itself)."""


def target(until: str) -> CommandStatus | EffectState:
    """What ``until`` names: a command status (``executed``) or a state of the summary (``succeeded``)."""
    if until in [*CommandStatus]:
        return CommandStatus(until)
    if until in [*EffectState]:
        return EffectState(until)
    known = ", ".join([*CommandStatus, *EffectState])
    raise ValidationError(f"cannot wait until {until!r}; wait for one of {known}", code="bad_until", field="until")


def reached(record: CommandRecord, until: CommandStatus | EffectState) -> bool:
    """Whether ``record`` is where ``until`` asks; raises ``EndedOtherwise`` once it never will be.

    A command status is reached by the command; an effect state by the record's ``summary``
    (``succeeded``: executed with every effect succeeded). A final status or a done summary
    that is not the one asked for ends the wait.
    """
    if isinstance(until, CommandStatus):
        if record.status is until:
            return True
        if record.status in TERMINAL:
            raise EndedOtherwise(f"command {record.command_id} ended {record.status}, not {until}"
                                 + (f" ({record.reason_code}: {record.reason})" if record.reason_code else ""), record)
        return False
    summary = record.summary
    if summary.state is until:
        return True
    if summary.done:
        raise EndedOtherwise(f"command {record.command_id} is {record.status} and its effects ended "
                             f"{summary.state}, not {until}" + (f": {summary.detail}" if summary.detail else ""),
                             record)
    return False


def settled(record: CommandRecord) -> bool:
    """Whether waiting longer is pointless: the command is done, or waits on someone else."""
    summary = record.summary
    return summary.done or (summary.state is EffectState.WAITING and summary.reason in NEEDS_SOMEONE)


class Waiting:
    """One wait: which windows of the stream to open, and whether a record ends it."""

    def __init__(self, command_id: uuid.UUID, until: str | None, timeout_s: float) -> None:
        self.command_id, self.timeout_s = command_id, timeout_s
        self.wanted = None if until is None else target(until)
        self.deadline = time.monotonic() + timeout_s
        self.last: CommandRecord | None = None

    def window(self) -> float | None:
        """How long the next stream may last; None once the wait is over."""
        remaining = self.deadline - time.monotonic()
        return min(remaining, MAX_STREAM_S) if remaining > 0 else None

    def saw(self, event: str, data: str) -> CommandRecord | None:
        """The record a ``status`` event carries if it ends the wait, else None (other events are
        not records)."""
        if event != "status":
            return None
        self.last = record = CommandRecord.model_validate_json(data)
        ends = settled(record) if self.wanted is None else reached(record, self.wanted)
        return record if ends else None

    def timed_out(self) -> WaitTimedOut:
        """The error of a wait whose time ran out, with the last record seen."""
        what = "settle" if self.wanted is None else f"reach {self.wanted}"
        last = self.last
        return WaitTimedOut(f"command {self.command_id} did not {what} within {self.timeout_s:g} s"
                            + (f"; it is {last.status}, effects {last.summary.state}" if last else ""), last)
