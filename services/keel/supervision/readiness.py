"""Readiness: whether a service can do its work now, and if not, why.

Liveness (the heartbeat, the watchdog) says a process is not stuck; readiness says that
what it depends on answers: the broker, the outbox database, the controls topic read to
its end. A probe (the gateway's ``/readyz``, the metrics server's ``/readyz``, ``keel
health --ready``) must answer at once even while a broker is away, so the checks run in
a background thread every ``INTERVAL_S`` and a probe reads the last verdict. A verdict
that stopped being refreshed (a check that hangs) counts as not ready.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass

from keel.outbox.db import Cursor, Database, SQLiteDatabase
from keel.outbox.store import Backlog, backlog
from keel.supervision.progress import Progress
from keel.supervision.resilient import broker_answers

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
CHECK_TIMEOUT_S = 1.0
STALE_AFTER_S = 5.0
"""A verdict older than this is not trusted: the checks themselves are stuck."""

Check = Callable[[], str | None]
"""One dependency's check: why it is not ready, or ``None`` when it is."""


@dataclass(frozen=True)
class Verdict:
    """The result of one round of checks."""

    reasons: tuple[str, ...]
    checked_at: float  # time.monotonic

    @property
    def ready(self) -> bool:
        """Whether every check passed."""
        return not self.reasons

    def as_dict(self, now: float | None = None) -> dict[str, object]:
        """The JSON body of a probe; ``checked_s_ago`` is null until a first round of checks ends (JSON has
        no infinity: a probe before it answered 500 instead of 503)."""
        age = (time.monotonic() if now is None else now) - self.checked_at
        return {"ready": self.ready, "reasons": list(self.reasons),
                "checked_s_ago": round(age, 3) if math.isfinite(age) else None}


NOT_CHECKED = Verdict(("starting: not checked yet",), float("-inf"))


class Readiness:
    """Runs named checks in a daemon thread; ``verdict`` returns the last result without waiting."""

    def __init__(self, checks: Mapping[str, Check], *, interval_s: float = INTERVAL_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.checks, self.interval_s, self.stale_after_s = dict(checks), interval_s, stale_after_s
        self._last = NOT_CHECKED
        self._failing: list[str] | None = None  # the checks that failed when a verdict was last logged
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> Verdict:
        """Run every check now (a check that raises is a reason too) and keep the result."""
        reasons, failing = [], []
        for name, check in self.checks.items():
            try:
                why = check()
            except Exception as exc:  # noqa: BLE001 - a failing check means not ready, not a dead thread
                why = f"check failed: {exc}"
            if why is not None:
                reasons.append(f"{name}: {why}")
                failing.append(name)
        verdict = Verdict(tuple(reasons), time.monotonic())
        if failing != self._failing:  # a reason's moving figures (an outage's backlog) are no new state
            self._failing = failing
            if failing:
                log.info("not ready: %s", "; ".join(verdict.reasons))
            else:
                log.info("ready")
        self._last = verdict
        return verdict

    def verdict(self) -> Verdict:
        """The last verdict; not ready when it is older than ``stale_after_s``."""
        last, now = self._last, time.monotonic()
        if last is not NOT_CHECKED and now - last.checked_at > self.stale_after_s:
            return Verdict((f"the readiness checks have not finished for {now - last.checked_at:.0f}s",),
                           last.checked_at)
        return last

    def start(self) -> Readiness:
        """Check every ``interval_s`` in a daemon thread, from now on."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.refresh()
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Stop checking (the thread ends after its current round)."""
        self._stop.set()


# -- checks -------------------------------------------------------------------------------


def broker(bootstrap: str, waiting: Callable[[], Backlog] | None = None) -> Check:
    """Some bootstrap server accepts a connection (cheap: no Kafka request, no client state).

    While none does, the reason also tells what the outage holds back in the outbox
    (``waiting``, read only then), so a probe shows whether commands pile up behind it.
    """
    def check() -> str | None:
        if broker_answers(bootstrap, CHECK_TIMEOUT_S):
            return None
        why = f"no broker answers at {bootstrap}"
        if waiting is None:
            return why
        try:
            return f"{why}; {waiting().describe(time.time())}"
        except Exception:  # noqa: BLE001 - the outbox check reports its own failure
            return why
    return check


def outbox(db: Database) -> Check:
    """The outbox database answers a query (on this thread's own connection, so no request waits for it)."""
    sqlite = db.path if isinstance(db, SQLiteDatabase) else None

    def check() -> str | None:
        try:
            with _reading(db) as cursor:
                cursor.query("SELECT 1" if sqlite is None else "SELECT count(*) FROM sqlite_master")
        except sqlite3.Error as exc:  # the fresh SQLite connection's own error, untranslated
            return f"the outbox database {sqlite} cannot be read: {exc}"
        except Exception as exc:  # noqa: BLE001 - InfraError, or any driver error: not ready
            return str(exc).splitlines()[0]
        return None
    return check


def outbox_backlog(db: Database) -> Callable[[], Backlog]:
    """What waits in the outbox for Kafka, read as the outbox check reads (never behind the writers)."""
    def read() -> Backlog:
        with _reading(db) as cursor:
            return backlog(cursor)
    return read


@contextmanager
def _reading(db: Database) -> Iterator[Cursor]:
    """A cursor for reads: on SQLite a fresh connection, which never takes the writers' lock; else the
    checker thread's own transaction."""
    if not isinstance(db, SQLiteDatabase):
        with db.transaction() as cursor:
            yield cursor
        return
    with closing(sqlite3.connect(f"{db.path.absolute().as_uri()}?mode=rw", uri=True,
                                 timeout=CHECK_TIMEOUT_S)) as connection:
        yield Cursor(connection.cursor(), postgres=False)


def flag(is_set: threading.Event, why_not: str) -> Check:
    """Ready once ``is_set`` is set (the gateway's controls read to their end)."""
    return lambda: None if is_set.is_set() else why_not


def worker(progress: Progress) -> Check:
    """A transactional worker is built and deciding, not starting, backing off or closing."""
    return lambda: None if progress.running else f"the worker is not running ({progress.step.name})"


# -- the process's probes -------------------------------------------------------------------

_current: Readiness | None = None


def install(readiness: Readiness) -> Readiness:
    """Make ``readiness`` the one this process's probes report (stopping the one it replaces), started."""
    global _current
    previous, _current = _current, readiness.start()
    if previous is not None and previous is not readiness:
        previous.stop()
    return readiness


def current() -> Readiness | None:
    """The readiness this process's probes report, if one was installed."""
    return _current
