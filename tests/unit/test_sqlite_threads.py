"""Threads that wrote to the SQLite outbox once and ended leave no descriptors behind (a gateway's
thread pool starts and ends threads all day), under the collector settings of a service, whose
collections come seldom."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from keel.outbox.db import open_database


def descriptors_of(path: Path) -> int:
    """How many of this process's descriptors are open on ``path``."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:  # the listing's own descriptor, closed meanwhile
            continue
    return found


@pytest.mark.usefixtures("settled_collector")
def test_a_thread_that_wrote_and_ended_leaves_no_descriptor_open(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    with db.transaction() as cursor:
        cursor.execute("CREATE TABLE t (n INTEGER)")

    def write(n: int) -> None:
        with db.transaction() as cursor:
            cursor.execute("INSERT INTO t (n) VALUES (?)", (n,))

    def threads_write(count: int) -> None:
        for n in range(count):
            thread = threading.Thread(target=write, args=(n,))
            thread.start()
            thread.join()

    threads_write(60)
    database_after_60 = descriptors_of(tmp_path / "outbox.sqlite3")
    threads_write(120)

    assert descriptors_of(tmp_path / "outbox.sqlite3.lock") <= 2  # the checkpointer's and this thread's at most
    # SQLite keeps a closed connection's descriptor while the process holds locks on the file and reuses it:
    # a few more after 120 more threads, not one each
    assert descriptors_of(tmp_path / "outbox.sqlite3") <= database_after_60 + 10
    db.close()


def test_none_and_bytes_parameters_bind_as_null_and_blob(tmp_path: Path) -> None:
    """The adapters that spare sqlite3 its attribute look-ups change no value bound."""
    db = open_database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    with db.transaction() as cursor:
        [row] = cursor.query("SELECT ? IS NULL, typeof(?), typeof(?), ?", (None, None, b"\x00\xff", b"\x00\xff"))
    assert row == (1, "null", "blob", b"\x00\xff")
    db.close()
