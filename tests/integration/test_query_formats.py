"""``GET /v1/query`` in json, csv, arrow and parquet over a real chDB: the same rows, typed columns,
the same refusals, and never another tenant's rows.

The principal comes from the ``X-Test-Principal`` header (``test_query_http``'s stand-in for the
key store); ClickHouse (chDB) and the projections are real.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.ipc  # type: ignore[import-untyped]  # noqa: F401
import httpx
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from keel.config import Settings
from keel.projector.clickhouse import connect
from keel.query.columnar import arrow_type, to_table
from keel.query.http import MAX_SQL_CHARS, build_query_router
from keel.query.render import ARROW_MEDIA_TYPE, PARQUET_MEDIA_TYPE
from keel.query.run import QueryResult
from keel.query.service import QueryGate
from tests.integration.test_query_http import principal_from_header
from tests.integration.test_query_tenancy import SECRET, seeded  # noqa: F401  (module fixture)

pytestmark = pytest.mark.integration

FORMATS = ("json", "csv", "arrow", "parquet")
SQL = ("SELECT tenant_id, aggregate_id, version, event_id, type, occurred_at, on_behalf_of, payload "
       "FROM events ORDER BY occurred_at, event_id")


@pytest.fixture
def http(seeded: Settings) -> Iterator[TestClient]:  # noqa: F811
    app = FastAPI()
    app.include_router(build_query_router(principal_from_header, settings=seeded, gate=QueryGate(2)))
    with TestClient(app) as client:
        yield client


def ask(http: TestClient, sql: str, format: str, who: str = "acme-analyst") -> Any:
    return http.get("/v1/query", params={"sql": sql, "format": format}, headers={"X-Test-Principal": who})


def table(http: TestClient, sql: str, format: str, who: str = "acme-analyst") -> Any:
    """The answer in an Arrow or Parquet ``format`` as a ``pyarrow.Table``."""
    answer = ask(http, sql, format, who)
    assert answer.status_code == 200, answer.text
    media = {"arrow": ARROW_MEDIA_TYPE, "parquet": PARQUET_MEDIA_TYPE}[format]
    assert answer.headers["content-type"] == media
    if format == "arrow":
        return pa.ipc.open_stream(answer.content).read_all()
    return pq.read_table(io.BytesIO(answer.content))


def test_every_format_gives_the_same_rows(http: TestClient) -> None:
    as_json = ask(http, SQL, "json").json()
    as_csv = list(csv.reader(io.StringIO(ask(http, SQL, "csv").text)))
    arrow, parquet = table(http, SQL, "arrow"), table(http, SQL, "parquet")

    columns = as_json["columns"]
    assert len(as_json["rows"]) == 3 and as_csv[0] == columns
    assert arrow.column_names == parquet.column_names == columns
    assert arrow.equals(parquet)
    for row, line, typed in zip(as_json["rows"], as_csv[1:], arrow.to_pylist(), strict=True):
        assert [typed[name] for name in columns] == [_from_json(name, value) for name, value in zip(columns, row)]
        assert line == ["" if value is None else str(value) for value in row]
    assert {row["tenant_id"] for row in arrow.to_pylist()} == {"acme"}


def _from_json(name: str, value: Any) -> Any:
    return datetime.fromisoformat(value) if name == "occurred_at" else value


def test_the_columns_are_typed_for_dataframes(http: TestClient) -> None:
    arrow = table(http, SQL, "arrow")
    frame = arrow.to_pandas()  # keel.client's contract: open_stream(body).read_all().to_pandas()

    assert arrow.schema.field("occurred_at").type == pa.timestamp("us", tz="UTC")
    assert pa.types.is_integer(arrow.schema.field("version").type)
    for text in ("tenant_id", "event_id", "type", "payload"):
        assert arrow.schema.field(text).type == pa.string(), text
    assert str(frame["occurred_at"].dt.tz) == "UTC" and list(frame["version"]) == [1, 2, 3]
    assert arrow.schema.metadata[b"keel.truncated"] == b"false"


def test_the_projections_clickhouse_types_map_to_arrow(seeded: Settings) -> None:  # noqa: F811
    """Every column type of the projected events, mapped and filled with the rows chDB gives."""
    client = connect(seeded)
    try:
        described = client.query(f"DESCRIBE ({SQL})").result_rows
        answer = client.query(SQL + " LIMIT 3")
    finally:
        client.close()
    types = tuple(str(row[1]) for row in described)
    typed = to_table(QueryResult(columns=tuple(answer.column_names), rows=tuple(map(tuple, answer.result_rows)),
                                 types=types))

    assert dict(zip(typed.column_names, [str(t) for t in typed.schema.types], strict=True)) == {
        "tenant_id": "string", "aggregate_id": "string", "version": "uint64", "event_id": "string",
        "type": "string", "occurred_at": "timestamp[us, tz=UTC]", "on_behalf_of": "string", "payload": "string"}
    assert typed.num_rows == 3 and typed.column("version").null_count == 0


@pytest.mark.parametrize(("clickhouse", "arrow"), [
    ("Nullable(Int32)", pa.int32()), ("UInt8", pa.uint8()), ("Float64", pa.float64()), ("Bool", pa.bool_()),
    ("LowCardinality(Nullable(String))", pa.string()), ("UUID", pa.string()), ("IPv6", pa.string()),
    ("DateTime64(3, 'Europe/Paris')", pa.timestamp("ms", tz="Europe/Paris")), ("DateTime", pa.timestamp("s")),
    ("Date", pa.date32()), ("Decimal(12, 2)", pa.decimal128(12, 2)), ("Decimal256(10)", pa.decimal256(76, 10)),
    ("Array(Nullable(UInt64))", pa.list_(pa.uint64())), ("Map(String, UInt8)", pa.string()),
    ("Int128", pa.string()),
])
def test_clickhouse_types_map_to_arrow_types(clickhouse: str, arrow: Any) -> None:
    assert arrow_type(clickhouse) == arrow


def test_values_that_do_not_fit_their_type_become_text_and_types_are_inferred_without_names() -> None:
    inferred = QueryResult(columns=("n", "at", "tags", "n"), rows=(
        (2**64 - 1, datetime(2026, 1, 2, tzinfo=UTC), ["a"], None), (None, None, [], None)))
    named = dataclasses.replace(inferred, types=("Int64", "DateTime64(6, 'UTC')", "Map(String, String)", "String"))

    typed, inferred = to_table(named), to_table(inferred)

    assert typed.column(0).to_pylist() == [str(2**64 - 1), None]  # beyond Int64: kept whole, as text
    assert typed.column(2).to_pylist() == ['["a"]', "[]"] and typed.column_names == ["n", "at", "tags", "n"]
    assert inferred.schema.field("at").type == pa.timestamp("us", tz="UTC")


@pytest.mark.parametrize("format", FORMATS)
def test_a_key_without_the_analyst_role_is_forbidden_in_every_format(http: TestClient, format: str) -> None:
    answer = ask(http, "SELECT 1", format, who="acme-agent")

    assert answer.status_code == 403 and answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize("format", FORMATS)
def test_another_tenants_rows_never_appear(http: TestClient, format: str) -> None:
    sql = "SELECT tenant_id, payload FROM events"

    globex, acme = seen(http, sql, format, "globex-analyst"), seen(http, sql, format, "acme-analyst")
    attack = ask(http, "SELECT * FROM system.tables", format)

    assert SECRET in globex and "acme" not in globex  # globex sees its own plan
    assert SECRET not in acme and "globex" not in acme and "acme" in acme
    assert attack.status_code == 400 and attack.json()["error"]["code"] == "table_not_allowed"


def seen(http: TestClient, sql: str, format: str, who: str) -> str:
    """Every value of the answer as text (Parquet pages may be compressed)."""
    if format in ("arrow", "parquet"):
        return repr(table(http, sql, format, who).to_pylist())
    answer = ask(http, sql, format, who)
    assert answer.status_code == 200, answer.text
    return str(answer.text)


def test_the_longest_sql_the_spec_allows_reaches_the_gateway_through_uvicorn(seeded: Settings) -> None:  # noqa: F811
    """Served as the gateway is (uvicorn, httptools): the longest ``sql`` of 4-byte characters, each
    sent as 12 bytes, is answered by the query API; one character more is its typed 422."""
    app = FastAPI()
    app.include_router(build_query_router(principal_from_header, settings=seeded, gate=QueryGate(2)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/query"
        longest = "SELECT '" + "\U0001F600" * (MAX_SQL_CHARS - len("SELECT ''")) + "'"
        headers = {"X-Test-Principal": "acme-analyst"}
        answer = httpx.get(url, params={"sql": longest}, headers=headers, timeout=30)
        beyond = httpx.get(url, params={"sql": longest + " "}, headers=headers, timeout=30)
    finally:
        server.should_exit = True
        thread.join(15)

    assert len(longest) == MAX_SQL_CHARS and answer.status_code == 200, answer.text
    assert answer.json()["rows"] == [["\U0001F600" * (MAX_SQL_CHARS - 9)]]
    assert beyond.status_code == 422 and beyond.headers["content-type"] == "application/json"
