"""Fixtures for the analytics suites (see tests/conftest.py for the shared ones)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

from keel.config import Settings
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations


@contextmanager
def migrated_database(settings: Settings) -> Iterator[Client]:
    """A client on ``settings.clickhouse_database`` with every projection applied; the database
    and the tenant-scoped databases made from it are dropped on the way out."""
    client = connect(settings)
    try:
        apply_migrations(client)
        yield client
    finally:
        database = settings.clickhouse_database
        scoped = client.query("SELECT name FROM system.databases WHERE startsWith(name, {prefix:String})",
                              parameters={"prefix": f"{database}__"}).result_rows
        for (name,) in [*scoped, (database,)]:
            client.command(f"DROP DATABASE IF EXISTS {quote_identifier(name)}")
        client.close()


@pytest.fixture
def migrated(settings: Settings) -> Iterator[Client]:
    """A client on this test's own database with every projection applied; dropped afterwards."""
    with migrated_database(settings) as client:
        yield client
