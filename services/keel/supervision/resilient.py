"""Run a transactional worker for as long as asked, whatever the broker does.

A broker that is away at start, a transaction that fails for good (a producer fenced
after an outage longer than ``transaction.timeout.ms``), or any Kafka error that escapes
the loop ends this worker, not the process: it is closed and a fresh one is built, with
a new producer that takes over the ``transactional.id`` (aborting whatever the old one
left open) and a consumer that rejoins the group and reloads its partitions. Waits
between tries grow from one second to half a minute, and each try is logged; a wait
that began with the broker unreachable ends as soon as it answers again, so a long
outage does not add a long wait after it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from confluent_kafka import KafkaException

from keel.errors import KeelError
from keel.supervision.progress import BACKOFF, Progress

log = logging.getLogger(__name__)

FIRST_WAIT_S = 1.0
LONGEST_WAIT_S = 30.0
HEALTHY_RUN_S = 60.0  # a worker that ran this long before failing starts the waits afresh


class TransactionalWorker(Protocol):
    """A consume-transform-produce loop: the processor, the chainer."""

    def run(self, stop: threading.Event) -> None: ...

    def close(self) -> None: ...


def run_resilient(build: Callable[[Progress], TransactionalWorker], stop: threading.Event, *, role: str,
                  progress: Progress, bootstrap: str) -> None:
    """Run the worker ``build`` makes until ``stop`` is set, building a fresh one after each failure."""
    wait = FIRST_WAIT_S
    while not stop.is_set():
        if not broker_answers(bootstrap):  # say so at once, not after every client's own timeout
            log.error("%s cannot start: no broker answers at %s; trying again in %.0fs", role, bootstrap, wait)
            wait = _back_off(stop, progress, wait, bootstrap)
            continue
        progress.enter("starting")
        try:
            worker = build(progress)
        except (KafkaException, KeelError) as exc:
            log.error("%s cannot start: %s; trying again in %.0fs", role, describe(exc), wait)
            wait = _back_off(stop, progress, wait, bootstrap)
            continue
        started = time.monotonic()
        progress.running = True
        try:
            worker.run(stop)
        except (KafkaException, KeelError) as exc:
            progress.running = False
            if time.monotonic() - started >= HEALTHY_RUN_S:
                wait = FIRST_WAIT_S
            log.warning("%s stopped: %s; starting again under a new producer in %.0fs", role, describe(exc), wait)
            wait = _back_off(stop, progress, wait, bootstrap, close=worker.close)
            continue
        progress.running = False
        progress.enter("closing")
        worker.close()


def _back_off(stop: threading.Event, progress: Progress, wait: float, bootstrap: str,
              close: Callable[[], None] | None = None) -> float:
    """Close what failed (a watched step), wait before the next try unless stopped; the next wait."""
    if close is not None:
        progress.enter("closing")
        try:
            close()
        except (KafkaException, KeelError) as exc:
            log.warning("closing the failed worker: %s", describe(exc))
    progress.enter(BACKOFF)
    wait_to_retry(stop, wait, bootstrap)
    return min(wait * 2, LONGEST_WAIT_S)


def wait_to_retry(stop: threading.Event, wait_s: float, bootstrap: str) -> None:
    """Wait ``wait_s``, or less once a broker that did not answer at first answers (checked every second)."""
    was_away = not broker_answers(bootstrap)
    deadline = time.monotonic() + wait_s
    while not stop.wait(min(1.0, wait_s)) and time.monotonic() < deadline:
        if was_away and broker_answers(bootstrap):
            return


def broker_answers(bootstrap: str, timeout_s: float = 1.0) -> bool:
    """Whether any of the ``host:port`` bootstrap servers accepts a TCP connection."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def describe(exc: BaseException) -> str:
    """One line for a Kafka or Keel error."""
    if isinstance(exc, KafkaException) and exc.args:
        return f"kafka: {exc.args[0]}"
    return str(exc)
