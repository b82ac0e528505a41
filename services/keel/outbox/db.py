"""One relational database behind the outbox and key stores: SQLite or PostgreSQL, by DSN.

Stores write portable SQL with ``?`` placeholders; this module runs it on either engine.
Connections are per thread (sqlite3 and psycopg connections are not shared across
threads), so a gateway's writer thread and its readers never step on each other.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import psycopg

from keel.errors import ConfigError, InfraError

Row = tuple[Any, ...]

log = logging.getLogger("keel.outbox")
_IDLE_S = 5.0
# WAL size, in checkpoint_pages, past which a commit checkpoints itself. Far above the
# usual restart point: SQLite cuts the file back to it at a restart, and truncating frees
# disk blocks, which on a disk mounted with online discard stalls every fsync meanwhile.
_BEHIND = 16
_PAGE = 4096  # SQLite's default page size, which the outbox keeps


# sqlite3 looks for an adapter for every parameter that is not exactly an int, float, str or
# bytearray. Finding none registered for None or bytes, it asks for ``__adapt__`` by attribute and
# builds and drops an AttributeError, about 1 µs a parameter (the tracker binds four a command,
# the gateway one). Registered, they bind as before (NULL, a BLOB) after one dict look-up.
def _null(_: None) -> None:
    return None


sqlite3.register_adapter(type(None), _null)
sqlite3.register_adapter(bytes, bytes)


class Cursor:
    """Runs ``?``-placeholder SQL on one engine inside one open transaction."""

    def __init__(self, raw: Any, postgres: bool) -> None:
        self._raw = raw
        self._postgres = postgres

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; returns the affected row count."""
        self._raw.execute(sql.replace("?", "%s") if self._postgres else sql, tuple(params))
        return int(self._raw.rowcount)

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run one statement once per row of parameters; returns the affected row count, summed.

        Why: the gateway's batches spent less CPU this way than as one multi-row ``VALUES``
        statement with ``RETURNING`` (measured on both engines; ``benchmarks/README.md``).
        """
        self._raw.executemany(sql.replace("?", "%s") if self._postgres else sql, rows)
        return int(self._raw.rowcount)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run a query and return every row."""
        self._raw.execute(sql.replace("?", "%s") if self._postgres else sql, tuple(params))
        return [tuple(row) for row in self._raw.fetchall()]


class Database(ABC):
    """A connection factory with transactions; the dialect decides a few DDL words."""

    serial: str
    blob: str
    is_postgres: bool

    def __init__(self) -> None:
        self._local = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """A write transaction: committed when the block ends, rolled back on error."""
        with self._translate(), self._begin() as cursor:
            yield cursor

    @abstractmethod
    def _begin(self) -> Any:
        """A context manager yielding a ``Cursor`` inside a transaction."""

    @abstractmethod
    def close(self) -> None:
        """Close this thread's connection."""

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.OperationalError, psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.close()  # the connection may be broken; the next call reconnects
            raise InfraError(f"the outbox database failed: {exc}", code="outbox_unavailable") from exc


class SQLiteDatabase(Database):
    """A SQLite file in WAL mode with full fsync: an acknowledged write survives power loss.

    Checkpoints run in a background thread, not inside commits. SQLite's automatic
    checkpoint runs in the ``COMMIT`` that fills the WAL (1,000 pages), while the writer
    still holds the write lock: every writer in every process waited for it to copy the
    pages to the database file and fsync it, several times a second under load. The
    background pass copies pages while writers go on; only the few pages written during
    the pass are copied under the lock, so the next writer can restart the WAL from its
    start and the file stays small. Should the thread fall far behind (writers keep the
    lock), commits checkpoint again themselves, as SQLite would.
    """

    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    blob = "BLOB"
    is_postgres = False

    def __init__(self, path: Path, checkpoint_pages: int = 1000, checkpoint_interval_s: float = 0.1) -> None:
        super().__init__()
        self.path = path
        self.checkpoint_pages = checkpoint_pages
        self.checkpoint_interval_s = checkpoint_interval_s
        self._checkpointer: threading.Thread | None = None
        self._starting = threading.Lock()
        self._commits = threading.Event()
        self._wal = f"{path}-wal"
        self._wal_limit = _BEHIND * checkpoint_pages * _PAGE  # the file is cut back to this at each restart
        path.parent.mkdir(parents=True, exist_ok=True)

    def _connection(self) -> sqlite3.Connection:
        held: _ThreadConnection | None = getattr(self._local, "connection", None)
        if held is None:
            held = self._local.connection = _ThreadConnection(self._connect())
        return held.connection

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        connection.execute(f"PRAGMA journal_size_limit={self._wal_limit}")
        return connection

    @contextmanager
    def _begin(self) -> Iterator[Cursor]:
        connection = self._connection()
        with self._write_lock(self._lock_file()):
            connection.execute("BEGIN IMMEDIATE")  # take the write lock now, not mid-transaction
            try:
                yield Cursor(connection.cursor(), postgres=False)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            if self._wal_size() > self._wal_limit:  # the checkpointer fell behind: help it
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self._commits.set()
        if self._checkpointer is None:
            self._start_checkpointer()

    @staticmethod
    @contextmanager
    def _write_lock(descriptor: int) -> Iterator[None]:
        # Writers queue on a kernel file lock first: SQLite's own busy handler polls with
        # sleeps of up to 100 ms, which two gateway worker processes turned into stalls.
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)

    def _wal_size(self) -> int:
        try:
            return os.stat(self._wal).st_size
        except FileNotFoundError:  # not in WAL mode (a file system without shared memory)
            return 0

    def _start_checkpointer(self) -> None:
        with self._starting:
            if self._checkpointer is None:
                self._checkpointer = threading.Thread(target=self._checkpoint_forever, name="sqlite-checkpointer",
                                                      daemon=True)
                self._checkpointer.start()

    def _checkpoint_forever(self) -> None:
        """Checkpoint after commits; exit after ``_IDLE_S`` without any (the next commit restarts it)."""
        try:
            with closing(self._connect()) as connection, _opened(f"{self.path}.lock") as lock:
                while True:
                    if not self._commits.wait(_IDLE_S):
                        with self._starting:
                            if not self._commits.is_set():
                                self._checkpointer = None
                                return
                    self._commits.clear()
                    self._checkpoint(connection, lock)
                    time.sleep(self.checkpoint_interval_s)
        except (sqlite3.Error, OSError):
            log.exception("the SQLite checkpointer failed; the next commit starts another",
                          extra={"path": str(self.path)})
            self._checkpointer = None

    def _checkpoint(self, connection: sqlite3.Connection, lock: int) -> None:
        """Copy WAL pages into the database file while writers go on; when the WAL holds
        ``checkpoint_pages`` or more, copy what they wrote meanwhile under the write lock, so
        the WAL is whole in the file and the next writer restarts it."""
        if connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] >= self.checkpoint_pages:
            with self._write_lock(lock):
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _lock_file(self) -> int:
        """This thread's descriptor of ``<db>.lock`` (``flock`` excludes per open file, so per thread).

        Held as a file object, which closes its descriptor when the thread ends and its locals go:
        a bare descriptor outlived every pool thread that wrote once, one per thread for ever.
        """
        lock: BinaryIO | None = getattr(self._local, "lock", None)
        if lock is None:
            lock = open(os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600), "r+b", buffering=0)
            self._local.lock = lock
        return lock.fileno()

    def close(self) -> None:
        held: _ThreadConnection | None = getattr(self._local, "connection", None)
        if held is not None:
            held.connection.close()
            self._local.connection = None
        lock = getattr(self._local, "lock", None)
        if lock is not None:
            lock.close()
            self._local.lock = None


class _ThreadConnection:
    """A thread's SQLite connection, closed as soon as the thread ends and its locals go.

    A ``sqlite3.Connection`` refers to itself through its statement cache, so a dropped one
    waits for the cyclic garbage collector, and a service's collector runs seldom
    (``keel.supervision.collector``). SQLite keeps the descriptor of a connection closed while
    another connection of the process holds locks on the file, and reuses it for the next
    open: closed one at a time, the pool threads' connections share a few descriptors; closed
    together by a late collection, each kept one.
    """

    __slots__ = ("connection",)

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __del__(self) -> None:
        self.connection.close()


class PostgresDatabase(Database):
    """A PostgreSQL database reached by a libpq DSN (``postgresql://…``)."""

    serial = "BIGSERIAL PRIMARY KEY"
    blob = "BYTEA"
    is_postgres = True

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn

    def _connection(self) -> psycopg.Connection[Any]:
        connection: psycopg.Connection[Any] | None = getattr(self._local, "connection", None)
        if connection is None or connection.closed:
            connection = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
            self._local.connection = connection
        return connection

    @contextmanager
    def _begin(self) -> Iterator[Cursor]:
        connection = self._connection()
        with connection.transaction(), connection.cursor() as raw:
            yield Cursor(raw, postgres=True)

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


@contextmanager
def _opened(path: str) -> Iterator[int]:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def open_database(dsn: str) -> Database:
    """The database a DSN names: ``sqlite:///abs/path`` or ``postgresql://…``."""
    if dsn.startswith("sqlite:///"):
        return SQLiteDatabase(Path(dsn.removeprefix("sqlite://")))
    if dsn.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(dsn)
    raise ConfigError(f"unsupported outbox DSN {dsn!r}; use sqlite:///path or postgresql://…",
                      code="bad_outbox_dsn", field="outbox_dsn")
