"""``GET /v1/query`` through a small FastAPI app: the principal, not the request, picks the tenant.

The test dependency maps an ``X-Test-Principal`` header to a principal; it stands in for
the gateway's API-key store. ClickHouse (chDB) is real.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Header, HTTPException
from fastapi.testclient import TestClient

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind
from keel.domain.principal import Principal
from keel.query.http import build_query_router
from keel.query.service import QueryGate
from tests.integration.test_query_tenancy import SECRET, seeded  # noqa: F401  (module fixture)

pytestmark = pytest.mark.integration

PRINCIPALS = {
    "acme-analyst": Principal(tenant_id="acme", actor=Actor(kind=ActorKind.HUMAN, id="ann"),
                              roles=frozenset({"analyst"})),
    "globex-analyst": Principal(tenant_id="globex", actor=Actor(kind=ActorKind.HUMAN, id="gus"),
                                roles=frozenset({"analyst"})),
    "acme-agent": Principal(tenant_id="acme", actor=Actor(kind=ActorKind.AGENT, id="bot"),
                            roles=frozenset({"support-agent"})),
}


def principal_from_header(x_test_principal: str = Header()) -> Principal:
    """The key store's stand-in."""
    if x_test_principal not in PRINCIPALS:
        raise HTTPException(401, "unknown test principal")
    return PRINCIPALS[x_test_principal]


@pytest.fixture
def http(seeded: Settings) -> Iterator[TestClient]:  # noqa: F811
    app = FastAPI()
    app.include_router(build_query_router(principal_from_header, settings=seeded, gate=QueryGate(2)))
    with TestClient(app) as client:
        yield client


def test_each_analyst_sees_only_their_tenant(http: TestClient) -> None:
    sql = "SELECT tenant_id, count() FROM events GROUP BY tenant_id"
    acme = http.get("/v1/query", params={"sql": sql}, headers={"X-Test-Principal": "acme-analyst"})
    globex = http.get("/v1/query", params={"sql": sql}, headers={"X-Test-Principal": "globex-analyst"})

    assert acme.status_code == globex.status_code == 200
    assert acme.json()["rows"] == [["acme", 3]] and globex.json()["rows"] == [["globex", 3]]


def test_csv_output_and_row_limit(http: TestClient) -> None:
    answer = http.get("/v1/query", params={"sql": "SELECT type FROM events ORDER BY type", "format": "csv",
                                           "limit": 2}, headers={"X-Test-Principal": "acme-analyst"})

    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(answer.text))) == [["type"], ["EmailQueued"], ["RefundIssued"]]


def test_attack_is_answered_400_with_its_code(http: TestClient) -> None:
    answer = http.get("/v1/query", params={"sql": "SELECT * FROM system.tables"},
                      headers={"X-Test-Principal": "acme-analyst"})

    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "table_not_allowed"
    assert SECRET not in answer.text


def test_a_principal_without_the_analyst_role_is_forbidden(http: TestClient) -> None:
    answer = http.get("/v1/query", params={"sql": "SELECT 1"}, headers={"X-Test-Principal": "acme-agent"})

    assert answer.status_code == 403 and answer.json()["error"]["code"] == "forbidden"


def test_limit_beyond_the_maximum_is_a_validation_error(http: TestClient) -> None:
    answer = http.get("/v1/query", params={"sql": "SELECT 1", "limit": 10**9},
                      headers={"X-Test-Principal": "acme-analyst"})

    assert answer.status_code == 422


def test_a_refused_read_outside_the_projections_is_heard_and_an_engine_error_is_not(
        seeded: Settings) -> None:  # noqa: F811
    heard: list[tuple[str, str, str]] = []
    app = FastAPI()
    app.include_router(build_query_router(
        principal_from_header, settings=seeded, gate=QueryGate(2),
        on_read_refused=lambda caller, error, sql: heard.append((caller.tenant_id, error.code, sql))))
    with TestClient(app) as client:
        for sql in ("SELECT * FROM system.tables", "SELECT nonsense FROM events"):
            assert client.get("/v1/query", params={"sql": sql},
                              headers={"X-Test-Principal": "acme-analyst"}).status_code == 400
    assert heard == [("acme", "table_not_allowed", "SELECT * FROM system.tables")]
