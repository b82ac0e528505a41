"""Gateway benchmark: commands accepted per second through HTTP into the durable outbox.

Stages, in one run:

1. ``kafka-raw``: raw idempotent ``acks=all`` produce of the same encoded commands (the baseline;
   measured last, listed first).
2. ``gateway-sqlite`` / ``gateway-postgres``: ``keel gateway`` (uvicorn, real sockets) with the
   outbox on a SQLite file (WAL, synchronous=FULL) and on a local PostgreSQL with its durable
   defaults (fsync, synchronous_commit on). Closed loop: C keep-alive connections send as fast
   as answers come back; the rate counts 202s only.
3. ``latency@R``: open loop at a fixed R requests/s; latency runs from each request's scheduled
   send time, so a stalled server cannot hide queueing (no coordinated omission).

Each measured stage starts after ``os.sync()``: the writeback of what setup and the previous
stage wrote would otherwise land in it (every acknowledgement waits for a disk sync). During
each latency stage ``disk_probe.py`` times small syncs on the same disk; its worst is printed
beside the stage's p99, so a tail that is the disk's own stall shows as such.

The closed loop runs ``wrk`` (C; ``apt-get install wrk``) when it is on the PATH, since the
load generator shares the two cores with the server it measures. Without it, and for the
open loop, a Python generator speaks HTTP/1.1 over asyncio streams by hand, on uvloop (Python
HTTP clients spend more CPU per request than the server). Every request carries its own command
id, as real clients do. Besides rates, each stage prints the gateway's own CPU time per
accepted command (all its processes, from ``/proc``): a figure that load from other
programs on the machine disturbs far less than the rate. Figures are printed, never judged.
Run: ``.venv/bin/python benchmarks/gateway.py`` after ``keel up``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import typer
import uvloop
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from rich.console import Console
from rich.table import Table

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind
from support_desk.messages import IssueRefund
from keel.domain.envelope import new_command
from keel.kafka.clients import admin_config, producer_config
from keel.outbox.db import open_database
from keel.outbox.local_postgres import find_binaries, start_postgres
from keel.outbox.store import OutboxStore
from keel.security.keys import KeyStore

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
console = Console()


@dataclass(frozen=True)
class Figures:
    """One stage's result."""

    stage: str
    rate: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    cpu_us: float | None = None  # the gateway's CPU time per accepted command
    generator: str = ""
    disk_sync_max_ms: float | None = None  # the worst sync of a probe on the same disk, during the stage


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def body(tenant: str, aggregate: int) -> bytes:
    """One IssueRefund command as the gateway receives it (tenant and actor come from the key)."""
    return json.dumps({"id": str(uuid.uuid4()), "type": "IssueRefund", "aggregate_id": f"sub-{aggregate}",
                       "payload": {"amount_cents": 1250, "currency": "EUR", "reason": "late delivery"}}).encode()


def kafka_raw(settings: Settings, count: int) -> Figures:
    """Raw produce of ``count`` encoded commands to a throwaway topic."""
    codec, topic = EnvelopeCodec(), f"bench-gateway-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(admin_config(settings))
    # Deleted at once with the topic: the broker's default waits a minute, then frees the
    # disk blocks in the middle of whatever runs next (a stall of every fsync meanwhile).
    admin.create_topics([NewTopic(topic, settings.topic_partitions, 1,
                                  config={"file.delete.delay.ms": "0"})])[topic].result()
    values = [codec.encode(new_command(IssueRefund(amount_cents=1250, currency="EUR", reason="late delivery"),
                                       tenant_id="acme", aggregate_id=f"sub-{i % 500}", actor=AGENT))
              for i in range(2000)]
    producer = Producer(producer_config(settings))
    started = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(topic, values[i % len(values)], key=f"acme/sub-{i % 500}".encode())
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)
    elapsed = time.perf_counter() - started
    admin.delete_topics([topic])
    return Figures("kafka-raw", count / elapsed)


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("KEEL_BENCH_TOKEN")
local sent = 0
math.randomseed(tonumber(os.getenv("KEEL_BENCH_SEED")))  -- else every wrk run sends the same ids
local run = string.format("%08x-%04x-4%03x", math.random(0, 0x7fffffff), math.random(0, 0xffff),
                          math.random(0, 0xfff))
request = function()
  sent = sent + 1
  return wrk.format(nil, nil, nil, string.format(
    '{"id":"%s-8%03x-%012x","type":"IssueRefund","aggregate_id":"sub-%d",' ..
    '"payload":{"amount_cents":1250,"currency":"EUR","reason":"late delivery"}}',
    run, math.random(0, 0xfff), sent, sent % 500))
end
"""


def closed_loop_wrk(port: int, token: str, connections: int, duration_s: float, folder: Path
                    ) -> tuple[int, int, float]:
    """The closed loop with ``wrk``; returns (accepted, errors, seconds)."""
    script = folder / "post.lua"
    script.write_text(WRK_SCRIPT)
    env = {**os.environ, "KEEL_BENCH_TOKEN": token, "KEEL_BENCH_SEED": str(uuid.uuid4().int % 2**31)}
    done = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration_s:.0f}s", "-s", str(script),
                           f"http://127.0.0.1:{port}/v1/commands"], env=env, capture_output=True, text=True,
                          check=True)
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", done.stdout)
    if total is None:
        raise RuntimeError(f"unexpected wrk output:\n{done.stdout}{done.stderr}")
    seconds = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    socket_errors = re.search(r"Socket errors: .*", done.stdout)
    errors = (int(refused.group(1)) if refused else 0) + (
        sum(int(n) for n in re.findall(r"\d+", socket_errors.group(0))) if socket_errors else 0)
    return int(total.group(1)) - (int(refused.group(1)) if refused else 0), errors, seconds


def tree_cpu_seconds(root: int) -> float:
    """User plus system CPU seconds of ``root`` and all its descendants, from ``/proc``."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, pending = 0.0, [root]
    while pending:
        pid = pending.pop()
        total += times.get(pid, 0.0)
        pending += children.get(pid, [])
    return total


class Connection:
    """One keep-alive HTTP/1.1 connection that posts commands."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str) -> None:
        self.reader, self.writer = reader, writer
        self.head = (f"POST /v1/commands HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()

    async def post(self, payload: bytes) -> int:
        """Send one command; returns the HTTP status."""
        self.writer.write(self.head + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header[9:12])
        length = int(header.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await self.reader.readexactly(length)
        return status


async def connect(port: int, token: str, count: int) -> list[Connection]:
    """``count`` open connections to the gateway."""
    pairs = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    return [Connection(reader, writer, token) for reader, writer in pairs]


async def closed_loop(port: int, token: str, connections: int, duration_s: float) -> tuple[int, int, float]:
    """Send as fast as answers come; returns (accepted, errors, seconds)."""
    pool, accepted, errors = await connect(port, token, connections), 0, 0
    deadline = time.perf_counter() + duration_s

    async def run(connection: Connection, worker: int) -> None:
        nonlocal accepted, errors
        while time.perf_counter() < deadline:
            if await connection.post(body("acme", worker)) == 202:
                accepted += 1
            else:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(run(c, n) for n, c in enumerate(pool)))
    elapsed = time.perf_counter() - started
    for connection in pool:
        connection.writer.close()
    return accepted, errors, elapsed


async def open_loop(port: int, token: str, rate: int, duration_s: float) -> tuple[list[float], int]:
    """Send at a fixed rate; latencies (ms) from each request's scheduled time, and errors.

    The generator's garbage collector is off while it sends: a full collection over the
    in-flight requests is a pause that would show up as the gateway's latency.
    """
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for connection in await connect(port, token, 64):
        idle.put_nowait(connection)
    latencies: list[float] = []
    errors = 0
    bodies = [body("acme", i % 500) for i in range(int(rate * duration_s))]

    async def one(scheduled: float, payload: bytes) -> None:
        nonlocal errors
        connection = await idle.get()
        status = await connection.post(payload)
        latencies.append((time.perf_counter() - scheduled) * 1000)
        errors += status != 202
        idle.put_nowait(connection)

    gc.collect()
    gc.disable()
    try:
        started, tasks = time.perf_counter(), []
        for index, payload in enumerate(bodies):
            scheduled = started + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled, payload)))
        await asyncio.gather(*tasks)
    finally:
        gc.enable()
    while not idle.empty():
        idle.get_nowait().writer.close()
    return sorted(latencies), errors


def agent_token(dsn: str) -> str:
    """A migrated outbox at ``dsn`` with tenant ``acme`` and an API key of the benchmark's agent; its token."""
    db = open_database(dsn)
    OutboxStore(db).migrate()
    keys = KeyStore(db)
    keys.create_tenant("acme")
    _, token = keys.create_key("acme", AGENT)
    db.close()
    return token


def wait_until_listening(port: int, server: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Return once the gateway ``server`` accepts connections on ``port``; its log's end if it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"the gateway did not start (exit {server.poll()}):\n"
                                   f"{log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.2)


def gateway_stage(name: str, dsn: str, data_dir: Path, settings: Settings, *, workers: int, connections: int,
                  duration_s: float, rate: int) -> list[Figures]:
    """Run ``keel gateway`` on ``dsn`` and measure it."""
    token = agent_token(dsn)
    port = free_port()
    env = {**os.environ, "KEEL_OUTBOX_DSN": dsn, "KEEL_DATA_DIR": str(data_dir),
           "KEEL_GATEWAY_KEY_CACHE_S": "30", "KEEL_LOG_LEVEL": "WARNING"}
    log = data_dir / f"gateway-{name}.log"
    server = subprocess.Popen([sys.executable, "-m", "keel.cli", "gateway", "--port", str(port),
                               "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        wait_until_listening(port, server, log, 30)
        uvloop.run(closed_loop(port, token, connections, 2.0))  # warm-up: imports, caches, connections
        generator = "wrk" if shutil.which("wrk") else "python"
        os.sync()
        cpu_before = tree_cpu_seconds(server.pid)
        if generator == "wrk":
            accepted, errors, elapsed = closed_loop_wrk(port, token, connections, duration_s, data_dir)
        else:
            accepted, errors, elapsed = uvloop.run(closed_loop(port, token, connections, duration_s))
        cpu_closed = tree_cpu_seconds(server.pid) - cpu_before
        os.sync()
        probe = subprocess.Popen([sys.executable, str(Path(__file__).with_name("disk_probe.py")),
                                  str(data_dir / f"probe-{name}"), str(duration_s * 3)], stdout=subprocess.PIPE)
        latencies, late_errors = uvloop.run(open_loop(port, token, rate, duration_s))
        probe.terminate()
        disk = json.loads(probe.communicate(timeout=30)[0])
        cpu_open = tree_cpu_seconds(server.pid) - cpu_before - cpu_closed
    finally:
        server.terminate()
        server.wait(30)
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99) - 1]
    return [Figures(f"gateway-{name}", accepted / elapsed, errors=errors, cpu_us=cpu_closed / max(accepted, 1) * 1e6,
                    generator=generator),
            Figures(f"gateway-{name} latency@{rate}/s", rate, p50, p99, late_errors,
                    cpu_us=cpu_open / max(len(latencies) - late_errors, 1) * 1e6, generator="python",
                    disk_sync_max_ms=disk["max_ms"])]


def main(duration: float = typer.Option(10.0, help="Seconds per measured stage."),
         workers: int = typer.Option(2, help="Gateway worker processes."),
         connections: int = typer.Option(64, help="Concurrent connections in the closed loop."),
         rate: int = typer.Option(1000, help="Requests per second of the latency stage."),
         kafka_count: int = typer.Option(200_000, help="Messages of the raw Kafka baseline."),
         postgres: bool = typer.Option(True, help="Also measure the PostgreSQL outbox.")) -> None:
    """Measure and print the gateway's figures next to the raw Kafka baseline."""
    settings = Settings()
    figures: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as folder:
        root = Path(folder)
        figures += gateway_stage("sqlite", f"sqlite:///{root / 'outbox.sqlite3'}", root, settings,
                                 workers=workers, connections=connections, duration_s=duration, rate=rate)
        if postgres:
            server = start_postgres(Path(tempfile.mkdtemp(prefix="bench-pg-")), free_port(), find_binaries())
            try:
                with psycopg.connect(server.dsn, autocommit=True) as admin:
                    admin.execute("CREATE DATABASE bench")
                figures += gateway_stage("postgres", server.dsn.rsplit("/", 1)[0] + "/bench", root, settings,
                                         workers=workers, connections=connections, duration_s=duration, rate=rate)
            finally:
                server.stop()
    # The baseline runs last: a burst of raw produce leaves the broker busy for seconds after
    # (compiling, collecting, deleting the topic), on the two cores the gateway stages share.
    figures.insert(0, kafka_raw(settings, kafka_count))
    baseline, load = figures[0].rate, os.getloadavg()
    table = Table("stage", "per second", "vs raw Kafka", "p50 ms", "p99 ms", "errors", "gateway CPU µs/cmd",
                  "load generator", "disk sync max ms",
                  title=f"gateway benchmark ({os.cpu_count()} cores, load {load[0]:.1f}, {workers} gateway workers)")
    for f in figures:
        table.add_row(f.stage, f"{f.rate:,.0f}", f"{f.rate / baseline:.3f}",
                      f"{f.p50_ms:.1f}" if f.p50_ms is not None else "",
                      f"{f.p99_ms:.1f}" if f.p99_ms is not None else "", str(f.errors),
                      f"{f.cpu_us:.0f}" if f.cpu_us is not None else "", f.generator,
                      f"{f.disk_sync_max_ms:.1f}" if f.disk_sync_max_ms is not None else "")
    console.print(table)
    print(json.dumps({"benchmark": "gateway", "workers": workers, "connections": connections, "load": load,
                      "figures": [f.__dict__ for f in figures]}))


if __name__ == "__main__":
    typer.run(main)
