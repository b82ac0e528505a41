"""What a transactional worker is doing now, and the heartbeat file that says so.

The worker's loop names each step before it takes it (``Progress.enter``); its watchdog
reads the step and how long it has lasted, and writes a heartbeat file that a liveness
check (``keel health``) and the supervisor read. One writer (the loop), one reader (the
watchdog): plain attribute writes under the GIL are enough.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from keel.config import Settings

IDLE = "idle"
"""Polling for records, none waiting: may last for ever."""
BACKOFF = "backoff"
"""Waiting before the next try to reach the broker: may last for ever."""
UNBOUNDED = frozenset({IDLE, BACKOFF})


@dataclass(frozen=True)
class Step:
    """A named step of the worker's loop and when it began (``time.monotonic``)."""

    name: str
    since: float


class Progress:
    """The worker's current step, its last committed transaction, and its partitions."""

    def __init__(self) -> None:
        self.step = Step("starting", time.monotonic())
        self.last_commit: float | None = None
        self.partitions = 0
        self.running = False
        """Whether a worker is built and running (not starting, backing off or closing): readiness reads it."""

    def enter(self, name: str) -> None:
        """Begin step ``name`` now (restarting its clock even if it is the current one)."""
        self.step = Step(name, time.monotonic())

    def stay(self, name: str) -> None:
        """Be in step ``name``, keeping its clock if it is already the current step."""
        if self.step.name != name:
            self.enter(name)

    def committed(self) -> None:
        """A transaction committed: the worker made progress, and is idle until its next batch."""
        self.enter(IDLE)
        self.last_commit = self.step.since

    def stalled(self, bound_s: float, now: float) -> str | None:
        """Why the worker counts as stalled at ``now``, or ``None`` while it is not."""
        step = self.step
        age = now - step.since
        if step.name in UNBOUNDED or age <= bound_s:
            return None
        return f"stuck in {step.name} for {age:.0f}s (bound {bound_s:.0f}s)"


@dataclass(frozen=True)
class Heartbeat:
    """One look at a worker, as written to its heartbeat file."""

    role: str
    instance: str
    pid: int
    step: str
    step_age_s: float
    last_commit_age_s: float | None
    partitions: int
    stalled: str | None
    written_at: float
    """Wall-clock time of the write (``time.time``), so a reader can tell a stale file."""
    ready: bool = True
    not_ready: str | None = None
    """Why the worker is not ready (``keel.supervision.readiness``), ``None`` when it is; a file
    written before readiness existed reads as ready."""

    @classmethod
    def of(cls, progress: Progress, role: str, instance: str, bound_s: float,
           not_ready: str | None = None) -> Heartbeat:
        """The heartbeat of ``progress`` now; ``not_ready`` says why the worker is not ready."""
        now = time.monotonic()
        last = progress.last_commit
        return cls(role=role, instance=instance, pid=os.getpid(), step=progress.step.name,
                   step_age_s=round(now - progress.step.since, 3),
                   last_commit_age_s=None if last is None else round(now - last, 3),
                   partitions=progress.partitions, stalled=progress.stalled(bound_s, now), written_at=time.time(),
                   ready=not_ready is None, not_ready=not_ready)

    def write(self, path: Path) -> None:
        """Replace ``path`` with this heartbeat."""
        replace_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> Heartbeat | None:
        """The heartbeat in ``path``, or ``None`` when there is none (or it is unreadable)."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def replace_json(path: Path, document: object) -> None:
    """Replace ``path`` with ``document`` as JSON in one rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(document))
    os.replace(temporary, path)


def heartbeat_path(settings: Settings, role: str, instance: str) -> Path:
    """Where the worker ``role``/``instance`` of ``settings``' topics writes its heartbeat."""
    return settings.data_dir / "run" / f"{settings.topic_prefix}.{role}.{instance}.json"


def liveness(beat: Heartbeat | None, now: float, stale_after_s: float) -> str | None:
    """Why the worker of ``beat`` is not live at wall-clock ``now``, or ``None`` when it is."""
    if beat is None:
        return "no heartbeat: the worker is not running, or has not started yet"
    if beat.stalled is not None:
        return f"stalled: {beat.stalled}"
    age = now - beat.written_at
    if age > stale_after_s:
        return f"the heartbeat is {age:.0f}s old (pid {beat.pid}): the process is gone or frozen"
    return None
