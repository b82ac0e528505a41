"""Analyst queries keep their clients of the projector's served engine between queries.

A real engine server runs in a process of its own (as the projector serves it) and its
address is published where the projector publishes it. Queries through
``keel.query.service.execute`` reuse one client, stay in their tenant's scope, find a
restarted owner at its new address, and report a stopped one as unavailable.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.analytics.owner import address_file
from keel.config import Settings
from keel.errors import InfraError, QueryError
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations
from keel.projector.rows import Position, event_row
from keel.projector.store import Batch, insert_batch
from keel.query import service
from keel.query.service import ClientPool, execute
from keel.supervision.progress import replace_json
from tests.integration.test_query import events_of

pytestmark = pytest.mark.integration

COUNT = "SELECT count() FROM events"


class Owner:
    """An engine server on one chDB path, published as the owner of ``settings``' engine."""

    def __init__(self, settings: Settings, path: Path) -> None:
        self.settings, self.path = settings, path
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> str:
        process = subprocess.Popen([sys.executable, "-m", "keel.analytics.server", str(self.path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout is not None
        port = int(process.stdout.readline())
        self.process = process
        file = address_file(self.settings)
        file.parent.mkdir(parents=True, exist_ok=True)
        replace_json(file, {"pid": process.pid, "port": port, "dsn": self.settings.analytics_dsn})
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            assert self.process.wait(timeout=30) == 0
            self.process = None


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[Owner]:
    path = tmp_path / "chdb"
    path.mkdir()
    settings = Settings(data_dir=tmp_path, clickhouse_dsn=f"chdb://{path}",
                        clickhouse_database=f"keel_{uuid.uuid4().hex[:8]}")
    served = Owner(settings, path)
    served.start()
    client = connect(settings, may_host=False)
    try:
        apply_migrations(client)
        batch = Batch("events")
        offset = 0
        for tenant, aggregates in (("acme", 2), ("globex", 1)):
            for index in range(aggregates):
                for event in events_of(tenant, f"sub-{index}"):
                    position = Position("events", 0, offset)
                    batch.add(event_row(event, position), position)
                    offset += 1
        insert_batch(client, batch)
    finally:
        client.close()
    yield served
    served.stop()


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[ClientPool]:
    """The process's pool, fresh for this test."""
    fresh = ClientPool()
    monkeypatch.setattr(service, "CLIENTS", fresh)
    yield fresh
    fresh.close()


def count(settings: Settings, tenant: str | None) -> int:
    result = execute(settings, COUNT, tenant=tenant, limit=10, timeout_s=10, may_host=False)
    return int(result.rows[0][0])


def test_queries_share_one_client_and_each_stays_in_its_tenant(owner: Owner, pool: ClientPool) -> None:
    settings = owner.settings
    assert [count(settings, "acme"), count(settings, "globex"), count(settings, None)] == [6, 3, 9]
    assert count(settings, "acme") == 6
    assert pool.idle() == 1

    with pool.lease(settings, may_host=False) as first:
        assert first.database == settings.clickhouse_database  # not the last query's tenant scope
    with pool.lease(settings, may_host=False) as again:
        assert again is first


def test_a_refused_query_keeps_its_client(owner: Owner, pool: ClientPool) -> None:
    with pytest.raises(QueryError) as refused:
        execute(owner.settings, "DROP TABLE events", tenant="acme", limit=10, timeout_s=10, may_host=False)
    assert refused.value.code == "not_read_only"
    assert pool.idle() == 1
    assert count(owner.settings, "acme") == 6


def test_a_restarted_owner_is_found_at_its_new_address(owner: Owner, pool: ClientPool) -> None:
    assert count(owner.settings, "acme") == 6
    owner.stop()
    address = owner.start()

    assert count(owner.settings, "acme") == 6
    with pool.lease(owner.settings, may_host=False) as client:
        assert client.url == address  # type: ignore[attr-defined]  # an HttpClient
    assert pool.idle() == 1


def test_a_stopped_owner_is_reported_not_queried(owner: Owner, pool: ClientPool) -> None:
    assert count(owner.settings, "globex") == 3
    owner.stop()

    with pytest.raises(InfraError) as unavailable:
        count(owner.settings, "globex")
    assert unavailable.value.code == "analytics_unavailable"
    assert pool.idle() == 0
