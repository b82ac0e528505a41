"""Analyst queries through the projector's served engine: time and CPU per query, on both sides.

A served engine (``python -m keel.analytics.server``, in a process of its own as the
projector runs it) on a throwaway chDB path holds the projections with ``--events`` events
of four tenants. Its address is published where the projector publishes it, so
``keel.query.service.execute`` (what ``GET /v1/query`` and ``keel query`` run, guard
included) finds it. Stages, each ``--queries`` queries round robin over the tenants:

- ``engine SELECT 1``: one raw HTTP request per query straight to the engine, the floor;
- ``execute``: analyst queries as the gateway runs them, clients kept between queries;
- ``execute, new client each``: the same with nothing kept (``ClientPool(idle_per_engine=0)``).

Per query: wall time, this process's CPU (the caller: the gateway's share) and the engine
process's CPU (the projector's share). Figures are printed, never judged. No broker needed:
``.venv/bin/python benchmarks/query.py``. The data dir is a temporary one, removed at the end.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from _common import TENANTS, process_tree_cpu, story
from keel.analytics.owner import address_file
from keel.config import Settings
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations
from keel.projector.rows import Position, event_row
from keel.projector.store import Batch, insert_batch
from keel.query import service
from keel.query.service import ClientPool, execute
from keel.supervision.progress import replace_json

SQL = "SELECT type, count() AS n FROM events WHERE _offset > {offset:UInt64} GROUP BY type ORDER BY type"


def timed(name: str, queries: int, engine_pid: int, run: Callable[[int], None]) -> dict[str, Any]:
    for index in range(min(20, queries)):  # warm: scopes prepared, caches filled
        run(index)

    def engine_cpu_s() -> float:
        return process_tree_cpu({"engine": engine_pid})["engine"]

    engine, caller, wall = engine_cpu_s(), time.process_time(), time.perf_counter()
    for index in range(queries):
        run(index)
    return {"stage": name, "queries": queries,
            "wall_ms": (time.perf_counter() - wall) / queries * 1e3,
            "caller_cpu_ms": (time.process_time() - caller) / queries * 1e3,
            "engine_cpu_ms": (engine_cpu_s() - engine) / queries * 1e3}


def load(settings: Settings, events: int) -> int:
    """About ``events`` rows over the four tenants (the reference story's envelopes: their size and
    columns are what counts here); returns how many went in."""
    client = connect(settings, may_host=False)
    batch, offset, aggregate = Batch("events"), 0, 0
    try:
        apply_migrations(client)
        while offset < events:
            tenant = TENANTS[aggregate % len(TENANTS)]
            for command in story(tenant, f"sub-{aggregate}", 1000 + aggregate):
                position = Position("events", aggregate % 6, offset)
                batch.add(event_row(command, position), position)
                offset += 1
            aggregate += 1
        insert_batch(client, batch)
    finally:
        client.close()
    return offset


def main(queries: int = typer.Option(200, help="Queries per stage."),
         events: int = typer.Option(20_000, help="Rows in the events projection."),
         json_only: bool = typer.Option(False, help="Print only the final JSON line.")) -> None:
    console = Console(stderr=True, quiet=json_only)
    folder = Path(tempfile.mkdtemp(prefix="bench-query-"))
    path = folder / "chdb"
    settings = Settings(data_dir=folder, clickhouse_dsn=f"chdb://{path}")
    engine = subprocess.Popen([sys.executable, "-m", "keel.analytics.server", str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert engine.stdout is not None
        port = int(engine.stdout.readline())
        address_file(settings).parent.mkdir(parents=True, exist_ok=True)
        replace_json(address_file(settings), {"pid": engine.pid, "port": port, "dsn": settings.analytics_dsn})
        loaded = load(settings, events)
        console.print(f"served engine on port {port} (pid {engine.pid}), {loaded:,} events, {queries} queries a stage")
        raw = http.client.HTTPConnection("127.0.0.1", port)

        def select_one(_: int) -> None:
            raw.request("GET", "/?query=SELECT%201")
            answer = raw.getresponse()
            answer.read()
            assert answer.status == 200

        def analyst(index: int) -> None:
            result = execute(settings, SQL, tenant=TENANTS[index % len(TENANTS)], limit=100, timeout_s=30,
                             parameters={"offset": index % 7}, may_host=False)
            assert result.rows

        figures = [timed("engine SELECT 1", queries, engine.pid, select_one)]
        for name, pool in (("execute", ClientPool()), ("execute, new client each", ClientPool(idle_per_engine=0))):
            service.CLIENTS = pool
            figures.append(timed(name, queries, engine.pid, analyst))
            pool.close()
    finally:
        engine.terminate()
        engine.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    table = Table(title=f"analyst queries through the served engine (load {os.getloadavg()[0]:.1f})")
    for column in ("stage", "wall ms", "caller CPU ms", "engine CPU ms"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for figure in figures:
        table.add_row(figure["stage"], f"{figure['wall_ms']:.2f}", f"{figure['caller_cpu_ms']:.2f}",
                      f"{figure['engine_cpu_ms']:.2f}")
    console.print(table)
    print(json.dumps({"benchmark": "query", "env": {"load_avg_1m": os.getloadavg()[0], "cores": os.cpu_count()},
                      "params": {"queries": queries, "events": loaded}, "figures": figures}, separators=(",", ":")))


if __name__ == "__main__":
    typer.run(main)
