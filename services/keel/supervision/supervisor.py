"""A transactional worker as a service: watched in its own process, restarted by its parent.

``keel process`` and ``keel chain`` run as two processes. The parent (``supervise``)
starts the worker as a child, restarts it whenever it ends unasked (a stalled worker
ends itself with ``STALLED_EXIT``; librdkafka 2.16 was also seen to abort on an internal
assertion, ``rd_kafka_enq_once_del_source_return: eonce->refcnt > 0``, after broker
restarts) or its heartbeat goes stale (a process too frozen for its own watchdog), and
passes SIGTERM and SIGINT on. The child (``run_watched``) runs the
worker under a watchdog and rebuilds it after the errors that return. Under systemd or
Kubernetes, run the child alone (``--no-supervise``), let the platform restart it, and
use ``keel health ROLE --instance ID`` as the liveness check.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from types import FrameType

from keel.config import Settings
from keel.supervision import readiness
from keel.supervision.progress import Heartbeat, Progress, heartbeat_path
from keel.supervision.resilient import (
    FIRST_WAIT_S,
    HEALTHY_RUN_S,
    LONGEST_WAIT_S,
    TransactionalWorker,
    run_resilient,
    wait_to_retry,
)
from keel.supervision.watchdog import Watchdog

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0
SUPERVISOR_PID = "KEEL_SUPERVISOR_PID"
"""Set by the supervisor in its child's environment: the child stops when that process is gone."""


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM and SIGINT set (instead of ending the process mid-transaction)."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def run_watched(settings: Settings, role: str, instance: str,
                build: Callable[[Progress], TransactionalWorker]) -> None:
    """Run the worker ``build`` makes under a watchdog until SIGTERM or SIGINT."""
    stop = stop_on_signals()
    progress = Progress()
    supervisor = os.environ.get(SUPERVISOR_PID)
    ready = readiness.install(readiness.Readiness({
        "broker": readiness.broker(settings.bootstrap_servers), "worker": readiness.worker(progress)}))
    watchdog = Watchdog(progress, heartbeat_path(settings, role, instance), role=role, instance=instance,
                        bound_s=settings.watchdog_stall_s, parent_pid=int(supervisor) if supervisor else None,
                        on_orphaned=stop.set, readiness=ready)
    watchdog.start()
    try:
        run_resilient(build, stop, role=role, progress=progress, bootstrap=settings.bootstrap_servers)
    finally:
        ready.stop()
        watchdog.stop()


def supervise(argv: list[str], settings: Settings, role: str, instance: str) -> None:
    """Run ``argv`` (the watched worker) as a child until SIGTERM or SIGINT, restarting it whenever it ends."""
    stop = stop_on_signals()
    path = heartbeat_path(settings, role, instance)
    wait = FIRST_WAIT_S
    while not stop.is_set():
        started = time.monotonic()
        child = subprocess.Popen(argv, env={**os.environ, SUPERVISOR_PID: str(os.getpid())})
        log.info("%s %s started as pid %d", role, instance, child.pid)
        while child.poll() is None and not stop.wait(1.0):
            why = frozen(Heartbeat.read(path), child.pid, time.monotonic() - started, settings.watchdog_stall_s)
            if why is not None:
                log.error("%s %s (pid %d) is frozen: %s; killing it", role, instance, child.pid, why)
                child.kill()
                child.wait()
        if stop.is_set():
            _stop_child(child, role)
            return
        code = child.wait()
        if time.monotonic() - started >= HEALTHY_RUN_S:
            wait = FIRST_WAIT_S
        log.warning("%s %s (pid %d) ended with exit code %d; starting it again in %.0fs",
                    role, instance, child.pid, code, wait)
        wait_to_retry(stop, wait, settings.bootstrap_servers)
        wait = min(wait * 2, LONGEST_WAIT_S)


def frozen(beat: Heartbeat | None, pid: int, running_s: float, bound_s: float) -> str | None:
    """Why the child ``pid``, started ``running_s`` ago, counts as frozen by its heartbeat, or ``None``."""
    if beat is None or beat.pid != pid:
        return f"no heartbeat {running_s:.0f}s after its start" if running_s > bound_s else None
    age = time.time() - beat.written_at
    return f"its heartbeat is {age:.0f}s old" if age > bound_s else None


def _stop_child(child: subprocess.Popen[bytes], role: str) -> None:
    """SIGTERM, then SIGKILL after ``STOP_GRACE_S``."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) did not stop within %.0fs; killing it", role, child.pid, STOP_GRACE_S)
            child.kill()
            child.wait()
