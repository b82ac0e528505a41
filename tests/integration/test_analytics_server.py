"""The analytics server: clickhouse-connect's HTTP client and Keel's own code against a chDB
engine that another process owns.

The server runs in a subprocess on a chDB path of its own: a test process may open one chDB
path only, and the session's is another.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from urllib.parse import urlencode

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from clickhouse_connect.driver.summary import QuerySummary

from keel.analytics import allocator
from keel.config import Settings
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations
from keel.projector.rows import Position, event_row
from keel.projector.store import Batch, insert_batch
from keel.query.run import run_query
from tests.integration.test_query import events_of

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Served:
    """A running server: its chDB path and port."""

    path: Path
    port: int

    @property
    def dsn(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def serve(path: Path, log: IO[str] | int = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "keel.analytics.server", str(path)],
                            stdout=subprocess.PIPE, stderr=log, text=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("served")
    path, log_path = base / "chdb", base / "server.log"
    path.mkdir()
    with log_path.open("w") as log:  # a file, not a pipe: a full pipe would stall the server
        process = serve(path, log)
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"the analytics server did not start: {log_path.read_text()}")
        yield Served(path, int(line))
        process.terminate()
        assert process.wait(timeout=30) == 0, log_path.read_text()


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    """A client on a database of this test's own, dropped afterwards."""
    client = clickhouse_connect.get_client(dsn=served.dsn, tz_mode="schema")
    database = f"served_{uuid.uuid4().hex[:10]}"
    client.command(f"CREATE DATABASE {database}")
    client.database = database
    yield client
    client.command(f"DROP DATABASE {database}")
    client.close()


def request(served: Served, method: str, params: dict[str, str], body: bytes | Iterator[bytes] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP exchange, for what clickhouse-connect does not send."""
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        connection.request(method, f"/?{urlencode(params)}" if params else "/", body=body,
                           encode_chunked=body is not None and not isinstance(body, bytes))
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_connect_time_handshake_and_ping(served: Served) -> None:
    client = clickhouse_connect.get_client(dsn=served.dsn)
    assert client.ping()
    assert client.server_version and client.server_tz is not None
    assert client.command("SELECT 1") == 1
    client.close()
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    connection.request("GET", "/ping")
    assert connection.getresponse().read() == b"Ok.\n"
    connection.request("GET", "/nowhere")
    assert connection.getresponse().status == 404
    connection.close()


@pytest.mark.parametrize("compress", [True, "zstd", "gzip", False])
def test_native_insert_and_query_round_trip(served: Served, client: Client, compress: bool | str) -> None:
    client.command("CREATE TABLE t (id UInt64, name String, note Nullable(String), tags Array(String), "
                   "kind LowCardinality(String), at DateTime64(6, 'UTC')) ENGINE = MergeTree ORDER BY id")
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    rows = [[i, f"name-{i}", None if i % 3 else f"note\t{i}\n", [f"t{i}", "x'y"], ("a", "b")[i % 2], at]
            for i in range(5000)]
    writer = clickhouse_connect.get_client(dsn=served.dsn, database=client.database, compress=compress)
    summary = writer.insert("t", rows)
    writer.close()

    assert summary.written_rows == len(rows)
    back = client.query("SELECT * FROM t ORDER BY id").result_rows
    assert [list(row) for row in back] == rows


def test_bind_parameters_short_and_long(client: Client) -> None:
    client.command("CREATE TABLE t (tenant String, n UInt64) ENGINE = MergeTree ORDER BY tenant")
    client.insert("t", [["acme", 1], ["acme", 2], ["globex", 3]])

    result = client.query("SELECT sum(n) FROM t WHERE tenant = {tenant:String} AND n >= {low:UInt64}",
                          parameters={"tenant": "acme", "low": 2})
    assert result.result_rows == [(2,)]
    assert client.query("SELECT count() FROM t WHERE tenant IN {names:Array(String)}",
                        parameters={"names": ["globex", "o'hara"]}).result_rows == [(1,)]
    # past 4 KiB of parameters clickhouse-connect sends a multipart form
    long = "é'\\\t" * 3000
    assert client.query("SELECT {s:String} = {t:String}, length({s:String})",
                        parameters={"s": long, "t": long}).result_rows == [(1, len(long.encode()))]
    assert client.command("SELECT count() FROM t WHERE tenant = {tenant:String}", parameters={"tenant": "acme"}) == 2


def test_commands_alter_exchange_rename(client: Client) -> None:
    client.command("CREATE TABLE live (id UInt64, v String) ENGINE = MergeTree ORDER BY id")
    client.command("CREATE TABLE shadow AS live")
    client.insert("live", [[1, "old"]])
    client.insert("shadow", [[1, "new"], [2, "new"]])

    assert isinstance(client.command("EXCHANGE TABLES live AND shadow"), QuerySummary)
    assert client.query("SELECT count() FROM live").result_rows == [(2,)]
    client.command("RENAME TABLE shadow TO live__previous")
    client.command("ALTER TABLE live ADD COLUMN extra UInt8 DEFAULT 7")
    client.command("ALTER TABLE live UPDATE v = 'redacted' WHERE id = {id:UInt64}", parameters={"id": 2},
                   settings={"mutations_sync": 2})
    assert client.query("SELECT id, v, extra FROM live ORDER BY id").result_rows == [(1, "new", 7), (2, "redacted", 7)]
    assert client.query("SELECT v FROM live__previous").result_rows == [("old",)]
    assert client.command("SELECT v FROM live WHERE id = 99") == ""  # a result set, empty
    assert client.command("EXISTS TABLE live") == 1


def test_errors_are_database_errors_with_the_engine_message(client: Client) -> None:
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE") as missing:
        client.query("SELECT * FROM nowhere")
    assert missing.value.code == 60
    with pytest.raises(DatabaseError, match="Syntax error") as syntax:
        client.command("SELEKT 1")
    assert syntax.value.code == 62
    with pytest.raises(DatabaseError, match="readonly") as readonly:
        client.command("CREATE TABLE t (a UInt8) ENGINE = Memory", settings={"readonly": 1})
    assert readonly.value.code == 164
    with pytest.raises(DatabaseError) as timeout:
        client.query("SELECT sum(number) FROM numbers(1e12)", settings={"max_execution_time": 0.5})
    assert timeout.value.code == 159
    client.command("CREATE TABLE t (a UInt8) ENGINE = Memory")
    with pytest.raises(DatabaseError, match="INCORRECT_DATA"):
        client.raw_insert("t", ["a"], "not a number\n", fmt="CSV")
    assert client.command("SELECT 1") == 1  # the server goes on


def test_settings_and_session_state_stay_with_their_request(client: Client) -> None:
    default = client.command("SELECT getSetting('max_block_size')")
    assert client.command("SELECT getSetting('max_block_size')", settings={"max_block_size": 1234}) == 1234
    client.command("SET max_block_size = 99")
    client.command("USE system")
    assert client.command("SELECT getSetting('max_block_size')") == default
    assert client.command("SELECT currentDatabase()") == client.database


def test_raw_protocol_bodies(served: Served, client: Client) -> None:
    database = str(client.database)
    client.command("CREATE TABLE t (a UInt32, b String) ENGINE = MergeTree ORDER BY a")

    status, _, _ = request(served, "POST", {"database": database}, b"INSERT INTO t FORMAT CSV\n1,one\n")
    assert status == 200
    status, _, _ = request(served, "POST", {"database": database, "query": "INSERT INTO t (a, b) FORMAT TSV"},
                           iter([b"2\ttwo\n", b"3\tth", b"ree\n"]))  # chunked
    assert status == 200
    status, headers, body = request(served, "POST", {"database": database, "param_min": "0"},
                                    b"SELECT a, b FROM t WHERE a > {min:UInt32} ORDER BY a")
    assert (status, body) == (200, b"1\tone\n2\ttwo\n3\tthree\n")
    assert headers["X-ClickHouse-Format"] == "TabSeparated"
    status, headers, body = request(served, "GET", {"database": database, "query": "SELECT count() FROM t"})
    assert (status, body) == (200, b"3\n")
    status, headers, body = request(served, "GET", {"query": "CREATE TABLE x (a UInt8) ENGINE = Memory"})
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "164")  # GET is read-only
    assert body.startswith(b"Code: 164. DB::Exception: ")


def test_parallel_queries_while_another_client_inserts_and_exchanges(served: Served, client: Client) -> None:
    client.command("CREATE TABLE live (n UInt64) ENGINE = MergeTree ORDER BY n")
    client.command("CREATE TABLE shadow AS live")
    rounds, readers = 25, 8
    done = threading.Event()
    failures: list[BaseException] = []
    seen: list[list[int]] = [[] for _ in range(readers)]

    def write() -> None:
        writer = clickhouse_connect.get_client(dsn=served.dsn, database=client.database)
        try:
            for round_ in range(rounds):
                writer.insert("live", [[round_ * 10 + i] for i in range(10)])
                writer.command("TRUNCATE TABLE shadow")
                writer.command("INSERT INTO shadow SELECT n FROM live")
                writer.command("EXCHANGE TABLES live AND shadow")
        except BaseException as exc:
            failures.append(exc)
        finally:
            writer.close()
            done.set()

    # half the readers own a client, half share one (sessionless, so threads may share it)
    shared = clickhouse_connect.get_client(dsn=served.dsn, database=client.database, autogenerate_session_id=False)

    def read(index: int) -> None:
        reader = shared if index % 2 else clickhouse_connect.get_client(dsn=served.dsn, database=client.database)
        try:
            while not done.is_set():
                (count, unique), = reader.query("SELECT count(), uniqExact(n) FROM live WHERE n >= {low:UInt64}",
                                                parameters={"low": 0}).result_rows
                assert count == unique and count % 10 == 0, (count, unique)
                seen[index].append(count)
        except BaseException as exc:
            failures.append(exc)
        finally:
            if reader is not shared:
                reader.close()

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read, args=(i,)) for i in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    shared.close()

    assert not failures, failures
    assert client.query("SELECT count() FROM live").result_rows == [(rounds * 10,)]
    for counts in seen:
        assert counts and counts == sorted(counts)  # never a step back, never a missing table


def test_keel_connect_migrations_inserts_and_queries(served: Served) -> None:
    settings = Settings(clickhouse_dsn=served.dsn, clickhouse_database=f"keel_{uuid.uuid4().hex[:10]}")
    client = connect(settings)
    try:
        assert client.database == settings.clickhouse_database
        report = apply_migrations(client)
        assert report.applied and not report.already_applied
        assert not apply_migrations(client).applied

        batch = Batch("events")
        for offset, event in enumerate(events_of("acme", "sub-1")):
            batch.add(event_row(event, Position("events", 0, offset)), Position("events", 0, offset))
        insert_batch(client, batch)
        result = run_query(client, "SELECT tenant_id, count() AS n FROM events GROUP BY tenant_id",
                           limit=10, timeout_s=10)
        assert result.rows == (("acme", len(batch.rows)),)
    finally:
        client.command(f"DROP DATABASE {settings.clickhouse_database}")
        client.close()


def test_a_second_process_cannot_serve_the_same_path(served: Served) -> None:
    process = serve(served.path)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "chdb_path_in_use" in err


def allocator_options(stats: str) -> dict[str, str]:
    """jemalloc's ``opt.<name>: <value>`` lines from ``system.jemalloc_stats``."""
    found = (line.strip().removeprefix("opt.").split(": ", 1) for line in stats.splitlines()
             if line.strip().startswith("opt."))
    return {name: value.split(" ")[0] for name, value in found}


WANTED = dict(option.split(":") for option in allocator.OPTIONS.split(","))


def test_the_served_engine_bounds_its_allocator_thread_caches(client: Client) -> None:
    options = allocator_options(str(client.query("SELECT stats FROM system.jemalloc_stats").result_rows[0][0]))
    assert {name: options.get(name) for name in WANTED} == WANTED


ENTRY_POINTS = {  # how a process comes to load chDB: each prints the engine's allocator statistics
    "open_handle": "from keel.analytics.server import open_handle; "
                   "print(open_handle(sys.argv[1]).query('SELECT stats FROM system.jemalloc_stats', 'TSVRaw').bytes().decode())",
    "projector client": "from keel.config import Settings; from keel.projector.clickhouse import connect; "
                        "client = connect(Settings(data_dir=sys.argv[1], clickhouse_dsn='chdb://' + sys.argv[1] + '/chdb')); "
                        "print(client.query('SELECT stats FROM system.jemalloc_stats').result_rows[0][0])",
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("operator_sets", [None, "tcache_max:2048"])
def test_a_process_hosting_the_engine_bounds_its_allocator_unless_the_operator_chose(
        tmp_path: Path, entry: str, operator_sets: str | None) -> None:
    env = {name: value for name, value in os.environ.items() if name != allocator.ENV}
    if operator_sets is not None:
        env[allocator.ENV] = operator_sets
    done = subprocess.run([sys.executable, "-c", "import sys; " + ENTRY_POINTS[entry], str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    options = allocator_options(done.stdout)
    expected = WANTED if operator_sets is None else {"tcache_max": "2048", "tcache_nslots_small_max": "200"}
    assert {name: options.get(name) for name in expected} == expected
