"""A private PostgreSQL server for the session (Debian's binaries), one database per test.

The server runs from a temporary folder on a free port (``keel.outbox.local_postgres``)
and is stopped when the session ends, however it ends. ``KEEL_TEST_PG_BIN`` overrides
the binaries folder (default: the newest ``/usr/lib/postgresql/*/bin``).
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from keel.errors import InfraError
from keel.outbox.local_postgres import UNSAFE_FAST, find_binaries, start_postgres


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The DSN of the session's PostgreSQL server (database ``postgres``)."""
    try:
        server = start_postgres(Path(tempfile.mkdtemp(prefix="keel-pg-")), _free_port(),
                                find_binaries(os.environ.get("KEEL_TEST_PG_BIN")), settings=UNSAFE_FAST)
    except InfraError as exc:
        pytest.fail(str(exc))
    try:
        yield server.dsn
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database for this test, dropped afterwards."""
    name = f"keel_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield postgres_server.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
