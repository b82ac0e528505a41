"""The watchdog thread: a heartbeat every second, and the end of a stalled process.

A step that outlasts its bound is a call that will not return (librdkafka#5456:
``send_offsets_to_transaction`` ignores its timeout; librdkafka#5511: it hangs when the
cached group coordinator is gone). Nothing in Python can interrupt it, and the consumer
stops polling, so the group drops the worker after ``max.poll.interval.ms`` while the
process looks alive. The watchdog logs why and ends the process with ``STALLED_EXIT``;
its supervisor starts a fresh one. The killed worker's open transaction is aborted when
the next producer with its ``transactional.id`` starts, so nothing is lost or repeated.

Each heartbeat also carries the worker's readiness (``keel.supervision.readiness``), so
``keel health --ready`` answers from the file without reaching the broker itself.

A supervised worker also watches its supervisor: when that process is gone (SIGKILLed,
say), the worker stops as on SIGTERM rather than run on unseen beside the next one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from keel.supervision.progress import Heartbeat, Progress
from keel.supervision.readiness import Readiness

log = logging.getLogger(__name__)

STALLED_EXIT = 75  # EX_TEMPFAIL: try again
INTERVAL_S = 1.0


def exit_stalled() -> None:
    """Flush the logs and end the process at once (a blocked thread would stop a normal exit)."""
    logging.shutdown()
    os._exit(STALLED_EXIT)


class Watchdog:
    """Writes the heartbeat of ``progress`` and calls ``on_stall`` once a step outlasts ``bound_s``."""

    def __init__(self, progress: Progress, path: Path, *, role: str, instance: str, bound_s: float,
                 on_stall: Callable[[], None] = exit_stalled, interval_s: float = INTERVAL_S,
                 parent_pid: int | None = None, on_orphaned: Callable[[], None] = lambda: None,
                 readiness: Readiness | None = None) -> None:
        self.progress, self.path, self.role, self.instance = progress, path, role, instance
        self.readiness = readiness
        self.bound_s, self.on_stall, self.interval_s = bound_s, on_stall, interval_s
        self.parent_pid, self.on_orphaned = parent_pid, on_orphaned
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"{role}-watchdog", daemon=True)

    def start(self) -> None:
        """Begin watching in a daemon thread."""
        self._thread.start()

    def check(self) -> Heartbeat:
        """Write one heartbeat; on a stall, log why and call ``on_stall``."""
        verdict = None if self.readiness is None else self.readiness.verdict()
        not_ready = None if verdict is None or verdict.ready else "; ".join(verdict.reasons)
        beat = Heartbeat.of(self.progress, self.role, self.instance, self.bound_s, not_ready)
        try:
            beat.write(self.path)
        except OSError as exc:  # a full disk must not stop the watching
            log.warning("cannot write the %s heartbeat %s: %s", self.role, self.path, exc)
        if beat.stalled is not None:
            log.error("%s %s is stalled: %s; ending the process so that a fresh worker takes over",
                      self.role, self.instance, beat.stalled,
                      extra={"step": beat.step, "partitions": beat.partitions})
            self.on_stall()
        return beat

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("the supervisor of %s %s (pid %d) is gone; stopping", self.role, self.instance,
                            self.parent_pid)
                self.parent_pid = None
                self.on_orphaned()

    def stop(self) -> None:
        """Stop watching and remove the heartbeat file (a stopped worker is not live)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s * 5)
        self.path.unlink(missing_ok=True)

