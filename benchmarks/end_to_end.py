"""End-to-end benchmark: from HTTP acceptance at the gateway until the command's events are queryable.

A whole deployment runs as real ``keel`` processes on a throwaway topic prefix and data dir:
``keel gateway`` (SQLite outbox), ``keel relay``, ``keel process`` (one or more workers),
``keel chain`` (the audit chain) and ``keel project --follow``, which owns the embedded chDB
and serves it to every reader, the gateway's ``GET /v1/query`` included. Nothing of the
user's ``.keel`` is touched; the broker is the one ``keel up`` runs. As ``keel dev`` does, a service
that ends is started again (and reported); the workers run under their own supervisors.

An open-loop generator posts the reference story (``_common.story``: start a subscription,
two refunds, one of them rejected by the domain, an e-mail whose address the gateway seals, a
cancellation) for four tenants, each command at its scheduled time whatever the answers do:
HTTP/1.1 pipelined over keep-alive connections, so a slow answer never delays a send (no
coordinated omission). Two pollers ask for the events past the Kafka positions they have seen:

* ``engine``, every few ms, the projector's engine server (ClickHouse's HTTP interface), one
  query for all tenants: the moment a row is there, every analyst's view shows it;
* ``GET /v1/query``, about once a second, with an analyst key per tenant: what an analyst
  sees through the gateway (each such query costs a dozen engine round trips: scope, guard).
  It runs in the warm-up, idle and latency stages; the throughput stages, whose figure is
  "queryable in ClickHouse", leave it out unless ``--throughput-analyst``: it moves every row
  through the gateway's JSON, which at thousands of commands a second is a heavier analyst
  than a deployment has and took a sixth of the machine (measured: 60 µs a command at 3,300/s).

A command counts as queryable when the first poll that returns an event caused by it
answers; the true moment lies after the poller's previous request, so each figure comes with
its lower bound and the poll cycle (the instrument's resolution), both printed.

Stages: a warm-up (every hop answers), an idle window (the pollers alone: what the
instrument costs), a latency stage at ``--rate`` (1,000/s), then a throughput stage per
``--offered`` rate: the rate at which commands become queryable while the generator still
sends, after its first 20 %, and whether the backlog (sent, not yet queryable) grew. Then
every command is checked in ClickHouse's raw rows (no FINAL): each accepted command has
exactly the events its id derives (no loss, no duplicate row), no refused one has any, and
``GET /v1/query`` counts as many commands; a failure exits 1. Over each window it reads the
CPU of each service (its process tree), of the broker's JVM (and of its JIT compiler's threads
apart), its own and the rest of the machine's from ``/proc``, and the time the hypervisor took from
the machine (steal), which is no one's work here. Last, the raw baseline: idempotent ``acks=all``
produce of the same workload's encoded commands. Figures are printed, never judged.

Run: ``.venv/bin/python benchmarks/end_to_end.py`` after ``keel up`` (``--help`` for options).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import typer
import uvloop
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from rich.table import Table

from _common import (
    STORY_LENGTH, TENANTS, environment, environment_table, machine_busy_seconds, machine_stolen_seconds,
    process_tree_cpu, reference_commands, status_console, unique_prefix,
)
from keel.analytics.owner import served_dsn
from keel.bootstrap import ensure_local_keys
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind
from keel.domain.effects import outcome_command_id
from keel.domain.events import EffectCancelled, EffectFailed, EffectRetried, EffectSucceeded
from keel.domain.outcomes import event_id
from keel.domains.registry import current
from keel.kafka.broker import broker_status
from keel.kafka.clients import admin_config, producer_config
from keel.kafka.topics import apply_topics, declared_topics
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.projector.clickhouse import connect
from keel.security.keys import KeyStore

BILLING = Actor(kind=ActorKind.SERVICE, id="billing")
AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
ANALYST = Actor(kind=ActorKind.HUMAN, id="ana.lyst")
GROUP_SECONDS = 2.0
"""How far apart one aggregate's consecutive commands are sent: the stories are interleaved in
groups of rate × this many aggregates, so that requests queued behind one another on different
connections rarely reorder them. A command that overtakes its aggregate's earlier one is
rejected by the domain: still exactly one event, but the mix of event types shifts."""
NOT_YET = -1.0
OUTCOME_EVENTS = (EffectSucceeded, EffectFailed, EffectCancelled, EffectRetried)
"""Events about an effect's outcome, caused by the effect worker's commands, not the generator's."""
OUTCOME_TYPES = frozenset(t.__name__ for t in OUTCOME_EVENTS)
console = status_console(False)


# -- the workload -----------------------------------------------------------------------


Tokens = dict[tuple[str, str], str]
"""API keys by (tenant, actor id)."""


class Workload:
    """The commands of one stage: command i is a step of some subscription's story, for some tenant.

    Command ids are ``<stage prefix>-8000-<index as 12 hex digits>``, so the poller maps a
    causation id back to its command without a lookup table, and bodies are built when sent.
    """

    def __init__(self, count: int, rate: float, tokens: Tokens) -> None:
        self.count = count
        self.group = max(100, int(rate * GROUP_SECONDS))
        self.prefix = uuid.uuid4().hex[:8] + "-" + uuid.uuid4().hex[:4] + "-4" + uuid.uuid4().hex[:3]
        self.tokens = tokens
        self._base = uuid.uuid4().int % 10**9  # aggregate ids unique per stage

    def command_id(self, index: int) -> str:
        return f"{self.prefix}-8000-{index:012x}"

    def index_of(self, command_id: str) -> int | None:
        """The index of one of this stage's command ids, else ``None``."""
        return int(command_id[24:], 16) if command_id.startswith(self.prefix) else None

    def step(self, index: int) -> tuple[str, int, int]:
        """(tenant, aggregate number, story step) of command ``index``."""
        group, within = divmod(index, self.group * STORY_LENGTH)
        step, member = divmod(within, self.group)
        aggregate = group * self.group + member
        return TENANTS[aggregate % len(TENANTS)], aggregate, step

    def request(self, index: int) -> bytes:
        """The whole HTTP request posting command ``index``: its story step's body template filled in
        (json.dumps per request cost the generator 6.3 µs a command, the template 2.4)."""
        tenant, aggregate, step = self.step(index)
        actor, template = self._templates[step]
        price = 1000 + aggregate % 9000
        data = (template % {"id": self.command_id(index), "sub": f"sub-{self._base}-{aggregate}",
                            "customer": f"cust-{self._base}-{aggregate}", "price": price,
                            "half": price // 2, "double": price * 2}).encode()
        return self.head(tenant, actor, data)

    @cached_property
    def _templates(self) -> list[tuple[str, str]]:
        """Per story step, its actor and its JSON body with ``%(name)`` fields, as ``json.dumps`` writes it."""
        head: dict[str, Any] = {"id": "%(id)s", "aggregate_id": "%(sub)s"}
        start = {**head, "type": "StartSubscription", "authority": {"role": "billing-service"},
                 "payload": {"customer_id": "%(customer)s", "plan": "pro", "monthly_price_cents": "%(price)d",
                             "currency": "EUR"}}
        by_agent = {**head, "on_behalf_of": "%(customer)s", "authority": {"role": "support-agent"},
                    "delegation": [{"actor": {"kind": "human", "id": "jane.lead"},
                                    "reason": "customer asked to cancel"}]}
        steps: list[tuple[str, dict[str, Any]]] = [
            ("IssueRefund", {"amount_cents": "%(half)d", "currency": "EUR", "reason": "unused half month",
                             "confidence": 0.93}),
            ("IssueRefund", {"amount_cents": "%(double)d", "currency": "EUR", "reason": "goodwill",
                             "confidence": 0.8}),
            ("SendEmail", {"to_address": "%(customer)s@example.com", "template": "refund-issued"}),
            ("CancelSubscription", {"reason": "customer request"}),
        ]
        bodies = [(BILLING.id, start)] + [(AGENT.id, {**by_agent, "type": kind, "payload": payload})
                                          for kind, payload in steps]
        # The integer fields were written as strings: unquote them (no other text holds a '%').
        return [(actor, re.sub(r'"(%\(\w+\)d)"', r"\1", json.dumps(body, separators=(",", ":"))))
                for actor, body in bodies]

    def post(self, tenant: str, actor: str, body: dict[str, Any]) -> bytes:
        """The whole HTTP request posting ``body`` with the key of ``actor`` of ``tenant``."""
        return self.head(tenant, actor, json.dumps(body, separators=(",", ":")).encode())

    def head(self, tenant: str, actor: str, data: bytes) -> bytes:
        """The whole HTTP request posting the JSON ``data`` with the key of ``actor`` of ``tenant``."""
        return (b"POST /v1/commands HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + self.tokens[(tenant, actor)].encode()
                + b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


# -- HTTP over raw keep-alive connections -------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, body)."""
    header = await reader.readuntil(b"\r\n\r\n")
    length = int(header.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return int(header[9:12]), await reader.readexactly(length)


class Pipeline(asyncio.Protocol):
    """One keep-alive connection that posts without waiting for answers (HTTP/1.1 pipelining).

    Answers come back in order; each is matched to the oldest command in flight as its bytes
    arrive (a protocol, not a stream reader: no task wake-up per answer, so the generator's own
    CPU stays small beside the services it measures). Only the status and Content-Length are read.
    """

    def __init__(self, run: StageRun) -> None:
        self.run = run
        self.in_flight: list[int] = []
        self._head = 0
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, index: int, request: bytes) -> None:
        assert self.transport is not None
        self.in_flight.append(index)
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start, now = 0, time.perf_counter()
        while True:
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                break
            header = bytes(buffer[start:end]).lower()
            length = int(header.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            if len(buffer) < end + 4 + length:
                break
            index = self.in_flight[self._head]
            self._head += 1
            self.run.accepted_at[index] = now
            self.run.status[index] = int(header[9:12])
            start = end + 4 + length
        del buffer[:start]
        if self._head > 4096:  # drop what was answered, now and then
            del self.in_flight[:self._head]
            self._head = 0

    def pending(self) -> int:
        return len(self.in_flight) - self._head

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Sightings:
    """When one poller first saw each command of a stage queryable."""

    def __init__(self, count: int) -> None:
        self.at = array("d", [NOT_YET]) * count
        """When the answer of the poll that first returned an event of the command arrived."""
        self.after = array("d", [NOT_YET]) * count
        """When that poller's previous request was sent: the command was not queryable then."""
        self.count = 0

    def see(self, index: int, answered: float, since: float) -> None:
        if self.at[index] == NOT_YET:
            self.at[index], self.after[index] = answered, since
            self.count += 1


@dataclass
class StageRun:
    """Per command of one stage: when it was scheduled, answered, and first seen by each poller."""

    workload: Workload
    rate: float
    pollers: tuple[str, ...]
    scheduled: array[float] = field(init=False)
    accepted_at: array[float] = field(init=False)
    status: array[int] = field(init=False)
    seen: dict[str, Sightings] = field(init=False)

    def __post_init__(self) -> None:
        n = self.workload.count
        self.scheduled = array("d", [NOT_YET]) * n
        self.accepted_at = array("d", [NOT_YET]) * n
        self.status = array("H", [0]) * n
        self.seen = {name: Sightings(n) for name in self.pollers}

    @property
    def queryable(self) -> int:
        """Commands the engine poller has seen (the first to see them)."""
        return self.seen[ENGINE].count

    def accepted(self) -> int:
        return sum(1 for s in self.status if s == 202)


async def open_loop(port: int, run: StageRun, connections: int, stop: threading.Event,
                    answer_timeout_s: float = 120.0) -> tuple[float, float]:
    """Post every command of ``run`` at its scheduled time; returns (start, worst lag behind schedule s).

    Sends happen in ticks: each wake-up sends every command whose time has come, round robin
    over the connections. The lag is how late the generator itself sent (its own stall),
    which latency from the scheduled time includes by design.
    """
    loop = asyncio.get_running_loop()
    pool = [(await loop.create_connection(lambda: Pipeline(run), "127.0.0.1", port))[1] for _ in range(connections)]
    workload, rate, worst_lag = run.workload, run.rate, 0.0
    started = time.perf_counter() + 0.05
    index, turn = 0, 0
    while index < workload.count and not stop.is_set():
        now = time.perf_counter()
        due = min(workload.count, int((now - started) * rate) + 1)
        if due > index:
            worst_lag = max(worst_lag, now - (started + index / rate))
        while index < due:
            run.scheduled[index] = started + index / rate
            pool[turn].send(index, workload.request(index))
            turn = (turn + 1) % connections
            index += 1
        # at least a millisecond, uvloop's timer resolution: it rounds a shorter sleep to none,
        # and the loop would spin; a tick per command would cost more than the sends anyway
        await asyncio.sleep(max(0.001, started + index / rate - time.perf_counter()))
    deadline = time.perf_counter() + answer_timeout_s  # a command never answered has status 0
    while any(p.pending() for p in pool) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    for p in pool:
        await p.close()
    return started, worst_lag


class Poller:
    """Asks for the events past the positions it has seen, again and again, and notes who they were for.

    Each target (the whole table, or one tenant's scope) has a keep-alive connection; all
    targets are asked at once, and a cycle starts ``interval_s`` after the previous one started
    (at once if it took longer). A row's ``causation_id`` names its command. Positions
    (partition, offset) only grow within a partition and the projector inserts its batches in
    order, so asking for rows past the highest position seen per partition, in position order,
    misses nothing even when an answer is cut at its row limit.
    """

    def __init__(self, name: str, port: Callable[[], int | None], targets: dict[str, Callable[[str], bytes]],
                 rows: Callable[[bytes], list[list[Any]]], interval_s: float) -> None:
        self.name, self.port, self.targets, self.rows, self.interval_s = name, port, targets, rows, interval_s
        self.runs: list[StageRun] = []
        self.positions: dict[str, dict[int, int]] = {target: {} for target in targets}
        self.cycles: list[float] = []  # seconds per poll, request to answer
        self.spans: list[float] = []  # resolution: previous request to this answer
        self.errors: Counter[str] = Counter()
        self.foreign = 0  # rows caused by no command of a stage we ran
        self._stop = asyncio.Event()

    def watch(self, run: StageRun) -> None:
        self.runs.append(run)

    def sql(self, target: str) -> str:
        """Rows past the highest position seen of each partition; any row of a partition not seen yet.

        One ``transform`` (partition → offset seen, -1 for none), not an ``OR`` per partition: over six
        partitions the engine took 7.1 against 8.7 ms of CPU a poll (chDB, 120,000 rows, the last 600
        new), and the projector that serves it is one of the services measured.
        """
        seen = self.positions[target]
        if not seen:
            where = "1 = 1"
        else:
            partitions, offsets = zip(*sorted(seen.items()))
            where = (f"toInt64(_offset) > transform(_partition, [{', '.join(map(str, partitions))}], "
                     f"[{', '.join(map(str, offsets))}], -1)")
        return (f"SELECT toString(causation_id), _partition, _offset, type FROM events WHERE {where} "
                "ORDER BY _partition, _offset LIMIT 100000")

    async def _ask(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   since: float) -> float:
        """One poll of ``target``; returns when it was sent."""
        sent = time.perf_counter()
        writer.write(self.targets[target](self.sql(target)))
        status, body = await read_response(reader)
        answered = time.perf_counter()
        self.cycles.append(answered - sent)
        if status != 200:
            self.errors[f"HTTP {status}: {body[:160].decode(errors='replace')}"] += 1
            return sent
        self.spans.append(answered - since)
        seen = self.positions[target]
        for cause, partition, offset, kind in self.rows(body):
            partition, offset = int(partition), int(offset)
            seen[partition] = max(seen.get(partition, -1), offset)
            if kind in OUTCOME_TYPES:  # an effect's outcome: the effect worker's command, checked by the soak
                continue
            for run in self.runs:
                index = run.workload.index_of(cause or "")
                if index is not None:
                    run.seen[self.name].see(index, answered, since)
                    break
            else:
                self.foreign += 1
        return sent

    async def run(self) -> None:
        """Poll until ``stop``; when the server goes away (a restarted service), connect again."""
        last_sent = {t: time.perf_counter() for t in self.targets}
        while not self._stop.is_set():
            links: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
            try:
                port = self.port()
                if port is None:
                    raise ConnectionError("no server to poll")
                for t in self.targets:
                    links[t] = await asyncio.open_connection("127.0.0.1", port)
                while not self._stop.is_set():
                    started = time.perf_counter()
                    sent = await asyncio.gather(*(self._ask(t, *links[t], last_sent[t]) for t in self.targets))
                    last_sent = dict(zip(self.targets, sent))
                    try:
                        await asyncio.wait_for(self._stop.wait(),
                                               max(0.0, started + self.interval_s - time.perf_counter()))
                    except TimeoutError:
                        pass
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.errors[f"connection: {type(exc).__name__}"] += 1
                await asyncio.sleep(0.5)
            finally:
                for _, writer in links.values():
                    writer.close()

    def stop(self) -> None:
        self._stop.set()


ENGINE, ANALYST_PATH = "engine", "GET /v1/query"


def engine_poller(settings: Settings, interval_s: float) -> Poller:
    """Polls the projector's engine server (ClickHouse's HTTP interface) for every tenant at once.

    The engine every reader uses, the table the analysts' views select from: a row is in an
    analyst's answer from the moment it is here (their views add FINAL, which collapses
    duplicate rows and hides none). Only the gateway's own work per query is left out.
    """
    database = settings.clickhouse_database

    def port() -> int | None:
        served = served_dsn(settings)  # a restarted projector serves on another port
        return int(served.rsplit(":", 1)[1]) if served else None

    def request(sql: str) -> bytes:
        query = urllib.parse.urlencode({"query": sql + " FORMAT JSONCompact", "database": database})
        return f"GET /?{query} HTTP/1.1\r\nHost: engine\r\n\r\n".encode()

    return Poller(ENGINE, port, {"all": request},
                  lambda body: json.loads(body)["data"], interval_s)


def analyst_poller(port: int, tokens: dict[str, str], interval_s: float) -> Poller:
    """Polls ``GET /v1/query`` with an analyst key per tenant: exactly what an analyst would see."""

    def request_for(token: str) -> Callable[[str], bytes]:
        def request(sql: str) -> bytes:
            target = "/v1/query?" + urllib.parse.urlencode({"sql": sql.removesuffix(" LIMIT 100000"),
                                                            "limit": 100_000})
            return f"GET {target} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        return request

    return Poller(ANALYST_PATH, lambda: port, {tenant: request_for(token) for tenant, token in tokens.items()},
                  lambda body: json.loads(body)["rows"], interval_s)


# -- the deployment ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Deployment:
    """Every service of a deployment as ``keel`` processes on throwaway topics and data dir."""

    settings: Settings
    root: Path
    gateway_workers: int
    processors: int
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    args: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    exits: list[str] = field(default_factory=list)
    """Services that ended during the run (and were started again), with the error they logged last."""
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    analyst_tokens: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    """``KEEL_*`` settings every service gets on top of the run's own."""
    provider_url: str | None = None
    """A provider simulator's URL: an effect worker (``keel effects run``) runs the decided effects against it."""

    @property
    def dsn(self) -> str:
        return f"sqlite:///{self.root / 'outbox.sqlite3'}"

    def prepare(self) -> None:
        """Topics, local keys (personal fields are sealed), the outbox, tenants and one key per actor."""
        apply_topics(AdminClient(admin_config(self.settings)), declared_topics(self.settings))
        ensure_local_keys(self.settings)
        db = open_database(self.dsn)
        try:
            OutboxStore(db).migrate()
            keys = KeyStore(db)
            for tenant in TENANTS:
                keys.create_tenant(tenant)
                for actor in (BILLING, AGENT):
                    self.tokens[(tenant, actor.id)] = keys.create_key(tenant, actor)[1]
                self.analyst_tokens[tenant] = keys.create_key(tenant, ANALYST, frozenset({"analyst"}))[1]
        finally:
            db.close()

    def start(self) -> None:
        """Start every service, each in a session of its own (a terminal's Ctrl-C reaches only us)."""
        env = {**os.environ, "KEEL_TOPIC_PREFIX": self.settings.topic_prefix,
               "KEEL_TOPIC_PARTITIONS": str(self.settings.topic_partitions),
               "KEEL_KAFKA_BOOTSTRAP": self.settings.bootstrap_servers, "KEEL_DATA_DIR": str(self.settings.data_dir),
               "KEEL_OUTBOX_DSN": self.dsn, "KEEL_GATEWAY_KEY_CACHE_S": "30", "KEEL_LOG_LEVEL": "WARNING",
               **self.extra_env}
        services = {"gateway": ["gateway", "--port", str(self.port), "--workers", str(self.gateway_workers)],
                    "relay": ["relay"], "projector": ["project", "--follow"],
                    # supervised, as in production: a worker its watchdog ends is started again
                    "chainer": ["chain", "--instance", "bench"],
                    **{f"processor-{n}": ["process", "--instance", f"bench{n}"]
                       for n in range(1, self.processors + 1)}}
        if self.provider_url is not None:
            services["effects"] = ["effects", "run", "--instance", "bench"]
            env |= {"SUPPORT_DESK_PAYMENTS_URL": self.provider_url, "SUPPORT_DESK_EMAIL_URL": self.provider_url}
        self.env, self.args = env, services
        for name, args in services.items():
            self._start(name, args)

    def launch(self, engine_timeout_s: float = 60) -> None:
        """Prepare, start every service, and wait until each answers and the projector serves the engine."""
        self.prepare()
        self.start()
        self.wait_ready()
        deadline = time.monotonic() + engine_timeout_s
        while served_dsn(self.settings) is None:  # the projector serves the engine once migrated
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the projector did not serve the engine in {engine_timeout_s:.0f} s:\n"
                                   f"{self.log_tail('projector')}")
            time.sleep(0.3)

    def remove(self, keep: bool) -> None:
        """Delete the run's topics and groups and, unless ``keep``, its data dir; say what could not go."""
        leftovers = remove_kafka_state(self.settings)
        if leftovers:
            console.print(f"[yellow]cleanup: {leftovers}[/yellow]")
        if keep:
            console.print(f"data dir kept: {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def _start(self, name: str, args: list[str]) -> None:
        with (self.root / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen([sys.executable, "-m", "keel.cli", *args], env=self.env,
                                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        """Start again any service that ended, as ``keel dev`` does, and note why it ended.

        A service that ends three times is given up on: the run fails with the end of its log.
        """
        for name, process in self.processes.items():
            if process.poll() is None:
                continue
            tail = self.log_tail(name, 20_000).strip().splitlines()
            errors = [line for line in tail if "Error" in line or '"level": "error"' in line]
            self.exits.append(f"{name} exited {process.returncode} at {time.strftime('%H:%M:%S')}: "
                              + (errors[-1][:300] if errors else "(no error logged)"))
            if sum(1 for e in self.exits if e.startswith(name + " ")) >= 3:
                raise RuntimeError(f"`keel {name}` exited three times; last:\n{self.log_tail(name)}")
            console.print(f"[yellow]{self.exits[-1]}; starting it again[/yellow]")
            self._start(name, self.args[name])

    def log_tail(self, name: str, chars: int = 2500) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def wait_ready(self, timeout_s: float = 90) -> None:
        """Until the gateway answers ``/readyz`` 200."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(b"GET /readyz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
                    if s.recv(64)[9:12] == b"200":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway was not ready within {timeout_s:.0f}s:\n{self.log_tail('gateway')}")
            time.sleep(0.3)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items()}

    def restarts(self) -> dict[str, int]:
        """Per service, how often a watchdog found its worker stalled and ended it (from the logs)."""
        return {name: count for name in self.processes
                if (count := self.log_tail(name, 10**9).count("is stalled"))}

    def stop(self) -> None:
        """SIGTERM in order (intake first), SIGKILL to each session still alive after 15 s."""
        order = ["gateway", "relay", *[n for n in self.processes if n.startswith("processor")], "chainer",
                 "effects", "projector"]
        order += [name for name in self.processes if name not in order]  # none is left running
        for name in order:
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name in order:
            process = self.processes.get(name)
            if process is None:
                continue
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                console.print(f"[yellow]{name} ignored SIGTERM for 15 s; killing its session[/yellow]")
            try:
                os.killpg(process.pid, signal.SIGKILL)  # its session: gateway workers included
            except ProcessLookupError:
                pass
            process.wait(10)


def remove_kafka_state(settings: Settings, patience_s: float = 60.0) -> list[str]:
    """Delete every topic and consumer group under the run's prefix; returns the problems.

    The chainer joins as a static member, which does not leave its group on close: the group
    stays non-empty until the member's session times out, so deletion is retried until then.
    """
    admin, prefix, problems = AdminClient(admin_config(settings)), settings.topic_prefix, []
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix + ".")]
    if topics:
        for name, future in admin.delete_topics(topics, operation_timeout=30).items():
            if future.exception() is not None:
                problems.append(f"topic {name}: {future.exception()}")
    groups = [g.group_id for g in admin.list_consumer_groups(request_timeout=15).result().valid
              if g.group_id.startswith(prefix + ".")]
    deadline = time.monotonic() + patience_s
    while groups:
        busy = []
        for name, future in admin.delete_consumer_groups(groups, request_timeout=30).items():
            error = future.exception()
            if error is not None and "NON_EMPTY_GROUP" in str(error) and time.monotonic() < deadline:
                busy.append(name)
            elif error is not None and "GROUP_ID_NOT_FOUND" not in str(error):
                problems.append(f"group {name}: {error}")
        groups = busy
        if groups:
            time.sleep(2)
    return problems


# -- measuring --------------------------------------------------------------------------


BROKER_JIT, STOLEN = "broker JIT", "stolen"
"""Rows of the CPU table beside the services': the broker's compiler threads (part of the broker's
row) and the time the hypervisor took from the machine's cores (part of no row)."""


@dataclass(frozen=True)
class CpuSample:
    wall: float
    by_service: dict[str, float]
    machine: float
    stolen: float
    broker_jit: float
    pids: dict[str, int]


def cpu_sample(pids: dict[str, int]) -> CpuSample:
    return CpuSample(time.perf_counter(), process_tree_cpu(pids), machine_busy_seconds(), machine_stolen_seconds(),
                     jit_seconds(pids.get("broker", 0)), dict(pids))


def jit_seconds(pid: int) -> float:
    """CPU seconds the JVM ``pid``'s JIT compiler threads (``C1``/``C2 CompilerThread``) have used.

    A broker compiles Kafka's hot code for minutes after it starts (a fresh one's compilers took half
    its CPU in a first run, 2026-12-07), a cost a long-running broker has paid long before.
    """
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    try:
        threads = os.listdir(f"/proc/{pid}/task") if pid else []
    except OSError:
        return 0.0
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/comm") as comm:
                if not comm.read().startswith(("C1 CompilerThre", "C2 CompilerThre")):
                    continue
            with open(f"/proc/{pid}/task/{thread}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile: the JVM stops idle compiler threads
        total += int(fields[11]) + int(fields[12])
    return total / tick


def cpu_shares(first: CpuSample, last: CpuSample, commands: int) -> dict[str, dict[str, float]]:
    """Per service: cores used over the window and CPU µs per command; ``others`` is the rest of the machine,
    ``broker JIT`` the part of the broker's that compiled code, ``stolen`` what the hypervisor took."""
    wall = last.wall - first.wall
    # a service started again during the window counts from its new start (its old process is gone)
    used = {name: last.by_service[name] - (first.by_service.get(name, 0.0) if first.pids.get(name) == pid else 0.0)
            for name, pid in last.pids.items()}
    used["others"] = max(0.0, last.machine - first.machine - sum(used.values()))
    used["machine"] = last.machine - first.machine
    same_broker = first.pids.get("broker") == last.pids.get("broker")
    used[BROKER_JIT] = max(0.0, last.broker_jit - (first.broker_jit if same_broker else 0.0))
    used[STOLEN] = last.stolen - first.stolen
    return {name: {"cores": seconds / wall, "us_per_command": seconds / max(commands, 1) * 1e6}
            for name, seconds in used.items()}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass
class Stage:
    """One measured stage's figures; ``latency`` per poller (``engine``, ``GET /v1/query``)."""

    name: str
    offered_rate: float
    seconds: float
    sent: int
    accepted: int
    refused: int
    unanswered: int
    """Sent, but no answer came within the drain timeout: accepted or not, nobody knows."""
    accepted_rate: float
    queryable_rate: float
    window_s: float
    backlog_start: int
    backlog_end: int
    kept_up: bool
    generator_worst_lag_ms: float
    accept_p50_ms: float
    accept_p99_ms: float
    drain_s: float
    """From the end of the window (the last send) until the last command was queryable."""
    drain_rate: float
    """Commands made queryable per second meanwhile."""
    latency: dict[str, dict[str, float]]
    cpu: dict[str, dict[str, float]]


def latency_figures(run: StageRun, poller: Poller, accepted: list[int], polls: slice, spans: slice,
                    seconds: float) -> dict[str, float]:
    """Scheduled send to first seen by ``poller``: p50/p99/max, the lower bounds, and the poller's own figures."""
    seen = run.seen[poller.name]
    hits = [i for i in accepted if seen.at[i] != NOT_YET]
    upper = [(seen.at[i] - run.scheduled[i]) * 1000 for i in hits]
    lower = [(max(seen.after[i], run.scheduled[i]) - run.scheduled[i]) * 1000 for i in hits]
    cycles, resolution = poller.cycles[polls], poller.spans[spans]
    return {"p50_ms": percentile(upper, 0.5), "p99_ms": percentile(upper, 0.99), "max_ms": max(upper, default=0.0),
            "lower_p50_ms": percentile(lower, 0.5), "lower_p99_ms": percentile(lower, 0.99),
            "not_seen": len(accepted) - len(hits), "polls": len(cycles), "polls_per_s": len(cycles) / seconds,
            "poll_p50_ms": percentile(cycles, 0.5) * 1000, "poll_p99_ms": percentile(cycles, 0.99) * 1000,
            "resolution_p50_ms": percentile(resolution, 0.5) * 1000,
            "resolution_p99_ms": percentile(resolution, 0.99) * 1000}


class Harness:
    """Runs the stages against one deployment; generator and pollers share one uvloop thread."""

    def __init__(self, deployment: Deployment, connections: int, poll_ms: float, analyst_poll_ms: float) -> None:
        self.deployment, self.connections = deployment, connections
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="generator", daemon=True)
        self.thread.start()
        self.pollers = [engine_poller(deployment.settings, poll_ms / 1000)]
        if analyst_poll_ms > 0:
            self.pollers.append(analyst_poller(deployment.port, deployment.analyst_tokens, analyst_poll_ms / 1000))
        self.tasks = [asyncio.run_coroutine_threadsafe(self._start(poller), self.loop).result()
                      for poller in self.pollers]
        self.retired: list[Poller] = []
        """Pollers stopped before the last stages: their sightings and errors are still reported."""
        self.stop = threading.Event()
        self.runs: list[StageRun] = []
        self.broker_pid = broker_status(Settings()).pid or 0

    @staticmethod
    async def _start(poller: Poller) -> asyncio.Task[None]:
        return asyncio.create_task(poller.run())

    @classmethod
    def warmed_up(cls, deployment: Deployment, connections: int, poll_ms: float, analyst_poll_ms: float) -> Harness:
        """Launch ``deployment``, then a harness on it once its first commands are queryable (every hop answers)."""
        deployment.launch()
        harness = cls(deployment, connections, poll_ms, analyst_poll_ms)
        console.print("warming up: every hop, until the first commands are queryable…")
        harness.warm_up(200)
        return harness

    def check_pollers(self) -> None:
        """Raise a poller's failure here, in the main thread."""
        for poller, task in zip(self.pollers, self.tasks):
            if task.done():
                raise RuntimeError(f"the {poller.name} poller ended: {task.exception()!r}")

    def retire(self, name: str) -> None:
        """Stop the ``name`` poller for the stages to come (they will not wait for it, nor time it)."""
        for index, poller in enumerate(self.pollers):
            if poller.name == name:
                self.loop.call_soon_threadsafe(poller.stop)
                asyncio.run_coroutine_threadsafe(asyncio.wait_for(self.tasks[index], 30), self.loop).result()
                self.retired.append(self.pollers.pop(index))
                self.tasks.pop(index)
                return

    def close(self) -> None:
        """Stop the pollers and the loop (idempotent)."""
        if not self.thread.is_alive():
            return
        for poller in self.pollers:
            self.loop.call_soon_threadsafe(poller.stop)
        time.sleep(0.3)
        for task in self.tasks:
            self.loop.call_soon_threadsafe(task.cancel)
        time.sleep(0.05)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def new_run(self, count: int, rate: float, workload: Callable[[int, float, Tokens], Workload] = Workload
                ) -> StageRun:
        run = StageRun(workload(count, rate, self.deployment.tokens), rate, tuple(p.name for p in self.pollers))
        for poller in self.pollers:
            poller.watch(run)
        self.runs.append(run)
        return run

    def _wait_queryable(self, run: StageRun, timeout_s: float) -> float:
        """Until every poller has seen every accepted command of ``run``; returns when the engine saw the last."""
        deadline = time.monotonic() + timeout_s
        accepted = run.accepted()
        while (any(seen.count < accepted for seen in run.seen.values())
               and time.monotonic() < deadline):
            self.deployment.check_alive()
            self.check_pollers()
            time.sleep(0.1)
        return max(run.seen[ENGINE].at) if run.queryable else time.perf_counter()

    def warm_up(self, commands: int) -> None:
        """Send a few stories slowly and wait until each is queryable: every hop works, scopes exist."""
        run = self.new_run(commands, 200.0)
        asyncio.run_coroutine_threadsafe(open_loop(self.deployment.port, run, 4, self.stop), self.loop).result()
        accepted = run.accepted()
        if accepted < commands:
            raise RuntimeError(f"the gateway refused {commands - accepted} of {commands} warm-up commands "
                               f"(statuses {Counter(run.status)}):\n{self.deployment.log_tail('gateway')}")
        self._wait_queryable(run, 180)
        missing = {name: accepted - seen.count for name, seen in run.seen.items() if seen.count < accepted}
        if missing:
            logs = "\n".join(f"--- {n}\n{self.deployment.log_tail(n, 800)}" for n in self.deployment.processes)
            errors = {p.name: dict(p.errors) for p in self.pollers}
            raise RuntimeError(f"warm-up commands not queryable after 180 s, per poller: {missing}; "
                               f"poll errors: {errors}\n{logs}")

    def stage(self, name: str, rate: float, seconds: float, drain_timeout_s: float, poll_s: float) -> Stage:
        """Offer ``rate`` commands/s for ``seconds``, polling the engine every ``poll_s``; rates and CPU
        over the window after the first 20 %."""
        self.pollers[0].interval_s = poll_s
        run = self.new_run(int(rate * seconds), rate)
        pids = self._pids
        os.sync()  # the writeback of what came before would land in the window
        marks, marked = [(len(p.cycles), len(p.spans)) for p in self.pollers], time.perf_counter()
        gc.collect()
        gc.disable()  # a full collection over the arrays would be the instrument's own stall
        try:
            future = asyncio.run_coroutine_threadsafe(
                open_loop(self.deployment.port, run, self.connections, self.stop, drain_timeout_s), self.loop)
            time.sleep(0.05 + seconds * 0.2)
            first, backlog_start, queryable_start = cpu_sample(pids()), self._backlog(run), run.queryable
            while not future.done() and time.perf_counter() < first.wall + seconds * 0.8 - 0.05:
                self.deployment.check_alive()
                self.check_pollers()
                time.sleep(0.05)
            last, backlog_end, queryable_end = cpu_sample(pids()), self._backlog(run), run.queryable
            _, worst_lag = future.result()
            ends, ended = [(len(p.cycles), len(p.spans)) for p in self.pollers], time.perf_counter()
            seen_last = self._wait_queryable(run, drain_timeout_s)
        finally:
            gc.enable()
        window = last.wall - first.wall
        ok = [i for i in range(run.workload.count) if run.status[i] == 202]
        accept = [(run.accepted_at[i] - run.scheduled[i]) * 1000 for i in ok]
        accepted_in_window = sum(1 for i in ok if first.wall <= run.accepted_at[i] < last.wall)
        return Stage(
            name=name, offered_rate=rate, seconds=seconds, sent=sum(1 for t in run.scheduled if t != NOT_YET),
            accepted=len(ok), refused=sum(1 for st in run.status if st not in (0, 202)),
            unanswered=sum(1 for i, st in enumerate(run.status) if st == 0 and run.scheduled[i] != NOT_YET),
            accepted_rate=accepted_in_window / window, queryable_rate=(queryable_end - queryable_start) / window,
            window_s=window, backlog_start=backlog_start, backlog_end=backlog_end,
            kept_up=backlog_end - backlog_start <= max(0.05 * rate * window, 0.5 * rate),
            generator_worst_lag_ms=worst_lag * 1000,
            accept_p50_ms=percentile(accept, 0.5), accept_p99_ms=percentile(accept, 0.99),
            drain_s=max(0.0, seen_last - last.wall),
            drain_rate=(run.queryable - queryable_end) / max(seen_last - last.wall, 1e-3),
            latency={p.name: latency_figures(run, p, ok, slice(m[0], e[0]), slice(m[1], e[1]), ended - marked)
                     for p, m, e in zip(self.pollers, marks, ends)},
            cpu=cpu_shares(first, last, max(queryable_end - queryable_start, 1)),
        )

    def idle(self, seconds: float) -> dict[str, dict[str, float]]:
        """Each service's cores with the pollers running and no command sent: the instrument's own cost.

        Also each poller's polls per second meanwhile (as ``poll <name>``), to scale that cost to
        a stage's poll rate.
        """
        polls = [len(p.cycles) for p in self.pollers]
        first = cpu_sample(self._pids())
        time.sleep(seconds)
        last = cpu_sample(self._pids())
        shares = cpu_shares(first, last, 1)
        for poller, before in zip(self.pollers, polls):
            shares[f"poll {poller.name}"] = {"per_s": (len(poller.cycles) - before) / (last.wall - first.wall)}
        return shares

    def _pids(self) -> dict[str, int]:
        """The processes to measure now: every service (restarted ones by their new pid), broker, harness."""
        return {**self.deployment.pids(), "broker": self.broker_pid, "harness": os.getpid()}

    @staticmethod
    def _backlog(run: StageRun) -> int:
        """Commands sent and not yet queryable, now (refused ones aside): the HTTP queue counts too."""
        sent = sum(1 for t in run.scheduled if t != NOT_YET)
        refused = sum(1 for st in run.status if st not in (0, 202))
        return sent - refused - run.queryable


# -- exactly once -----------------------------------------------------------------------


def exactly_once(settings: Settings, runs: list[StageRun],
                 effects: bool = False) -> tuple[list[str], Counter[str]]:
    """Every accepted command has exactly its events in ClickHouse's raw rows; refused ones none.

    Reads the events table itself (no FINAL: a row written twice shows) through the ops path
    (the projector's engine server). A command's events are ``event_id(command, 0..n-1)``. A
    command sent but never answered may have been accepted: it may have no events or its own
    events once, nothing else. With ``effects`` (an effect worker ran), every effect an event
    opened has exactly one outcome event, once, caused by its outcome command
    (``outcome_command_id``); those are the only events no command of the run caused.
    Returns the problems and the event types seen.
    """
    client = connect(settings, may_host=False)
    try:
        rows = client.query("SELECT toString(causation_id), event_id, type, count() FROM events "
                            "GROUP BY causation_id, event_id, type").result_rows
    finally:
        client.close()
    by_command: dict[str, list[tuple[uuid.UUID, int]]] = {}
    types: Counter[str] = Counter()
    for cause, event, kind, copies in rows:
        by_command.setdefault(cause, []).append((event, copies))
        types[kind] += copies
    problems: list[str] = []
    lost = twice = wrong = stray = 0
    for run in runs:
        for index in range(run.workload.count):
            command = run.workload.command_id(index)
            events = by_command.pop(command, [])
            unanswered = run.status[index] == 0
            if run.status[index] != 202 and not unanswered:
                stray += bool(events)
                continue
            if not events:
                lost += not unanswered
                continue
            twice += sum(1 for _, copies in events if copies > 1)
            expected = {event_id(uuid.UUID(command), k) for k in range(len(events))}
            wrong += {e for e, _ in events} != expected
    unsettled = 0
    if effects:  # an effect's id is the id of the event that opened it
        opening = current().effect_of
        for effect_id in {event for _, event, kind, _ in rows if kind in opening}:
            outcome = by_command.pop(str(outcome_command_id(effect_id, 0)), [])
            unsettled += not outcome
            twice += sum(1 for _, copies in outcome if copies > 1)
    for what, n in (("accepted commands with no event", lost), ("events stored more than once", twice),
                    ("effects with no outcome", unsettled),
                    ("commands whose event ids are not their own 0..n-1", wrong),
                    ("refused commands with events", stray),
                    ("events caused by no command of the run", sum(len(v) for v in by_command.values()))):
        if n:
            problems.append(f"{what}: {n:,}")
    return problems, types


def query_view_counts(port: int, tokens: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Per tenant, through ``GET /v1/query`` (the FINAL views): (events, distinct causing commands), leaving
    out the outcomes of effects (an effect worker's commands, not the generator's)."""
    counts = {}
    sql = ("SELECT count(), uniqExact(causation_id) FROM events WHERE type NOT IN "
           f"({', '.join(map(repr, sorted(OUTCOME_TYPES)))})")
    for tenant, token in tokens.items():
        target = "/v1/query?" + urllib.parse.urlencode({"sql": sql})
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {token}\r\nConnection: close"
                      "\r\n\r\n".encode())
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        row = json.loads(answer.split(b"\r\n\r\n", 1)[1])["rows"][0]
        counts[tenant] = (int(row[0]), int(row[1]))
    return counts


# -- the raw baseline -------------------------------------------------------------------


def kafka_raw(settings: Settings, count: int) -> float:
    """Raw idempotent ``acks=all`` produce of the reference workload's encoded commands (msgs/s)."""
    codec = EnvelopeCodec()
    commands = reference_commands(400)
    values = [(codec.encode(c), f"{c.tenant_id}/{c.aggregate_id}".encode()) for c in commands]
    topic = f"{settings.topic_prefix}.raw"
    admin = AdminClient(admin_config(settings))
    admin.create_topics([NewTopic(topic, settings.topic_partitions, 1,
                                  config={"file.delete.delay.ms": "0"})])[topic].result()
    producer = Producer(producer_config(settings))
    started = time.perf_counter()
    for i in range(count):
        value, key = values[i % len(values)]
        while True:
            try:
                producer.produce(topic, value, key=key)
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)
    return count / (time.perf_counter() - started)


# -- output -----------------------------------------------------------------------------


SERVICE_ORDER = ("gateway", "relay", "processor", "chainer", "projector", "broker", BROKER_JIT, "harness", "others")


def stages_table(stages: list[Stage], raw: float | None) -> Table:
    """Rates and latencies per stage."""
    table = Table(title="end to end: scheduled send → HTTP 202 → events queryable")
    for column in ("stage", "offered/s", "202/s", "queryable/s", "kept up", "backlog", "refused · no answer",
                   "202 p50/p99 ms", "engine p50/p99/max ms", "GET /v1/query p50/p99 ms", "gen. lag ms",
                   "drain s (/s)"):
        table.add_column(column, justify="right")
    for s in stages:
        engine, analyst = s.latency.get(ENGINE, {}), s.latency.get(ANALYST_PATH, {})
        table.add_row(s.name, f"{s.offered_rate:,.0f}", f"{s.accepted_rate:,.0f}", f"{s.queryable_rate:,.0f}",
                      "yes" if s.kept_up else "[red]no[/red]", f"{s.backlog_start:,}→{s.backlog_end:,}",
                      f"{s.refused:,} · {s.unanswered:,}",
                      f"{s.accept_p50_ms:.0f}/{s.accept_p99_ms:.0f}",
                      f"{engine['p50_ms']:,.0f}/{engine['p99_ms']:,.0f}/{engine['max_ms']:,.0f}",
                      f"{analyst['p50_ms']:,.0f}/{analyst['p99_ms']:,.0f}" if analyst else "-",
                      f"{s.generator_worst_lag_ms:.0f}", f"{s.drain_s:.1f} ({s.drain_rate:,.0f})")
    if raw is not None:
        table.caption = f"raw Kafka produce of the same encoded commands, same broker: {raw:,.0f} msgs/s"
    return table


def instrument_table(stages: list[Stage]) -> Table:
    """What each poller cost and how finely it resolves: the bound on the latencies above."""
    table = Table(title="the instruments: a poll (request → answer) and the resolution (previous request → answer)")
    for column in ("stage", "poller", "polls", "poll p50/p99 ms", "resolution p50/p99 ms",
                   "lower bound p50/p99 ms"):
        table.add_column(column, justify="right")
    for s in stages:
        for name, f in s.latency.items():
            table.add_row(s.name, name, f"{f['polls']:,.0f}", f"{f['poll_p50_ms']:.1f}/{f['poll_p99_ms']:.1f}",
                          f"{f['resolution_p50_ms']:.1f}/{f['resolution_p99_ms']:.1f}",
                          f"{f['lower_p50_ms']:,.0f}/{f['lower_p99_ms']:,.0f}")
    return table


def keel_cpu(stage: Stage, idle: dict[str, dict[str, float]]) -> dict[str, float]:
    """Keel's CPU per queryable command: its services and the broker, the pollers' queries included.

    ``ceiling`` is the rate at which that cost would fill every core of the machine: roughly
    what the pipeline could reach with the machine to itself, were it CPU-bound. The idle
    window shows how much of the cost is the instrument's (and heartbeats', metrics').
    """
    names = [n for n in stage.cpu if n not in ("harness", "others", "machine", BROKER_JIT, STOLEN)]
    gross = sum(stage.cpu[n]["us_per_command"] for n in names)
    return {"us_per_command": gross, "ceiling_commands_per_s": (os.cpu_count() or 1) * 1e6 / gross if gross else 0.0}


def cpu_table(stages: list[Stage], idle: dict[str, dict[str, float]], cores: int) -> Table:
    """Each service's cores over each stage's window, and CPU µs per command made queryable."""
    table = Table(title=f"CPU over each window: cores used (of {cores}) · µs per queryable command")
    table.add_column("service")
    table.add_column("idle (pollers only)", justify="right")
    for s in stages:
        table.add_column(s.name, justify="right")
    processors = sorted({n for s in stages for n in s.cpu if n.startswith("processor")})
    names = [*SERVICE_ORDER[:2], *processors, *SERVICE_ORDER[3:], "machine", STOLEN]
    for name in names:
        table.add_row(name, f"{idle[name]['cores']:.2f}" if name in idle and "cores" in idle[name] else "",
                      *(f"{s.cpu[name]['cores']:.2f} · {s.cpu[name]['us_per_command']:,.0f}"
                        if name in s.cpu else "" for s in stages))
    table.add_row("polls/s engine · /v1/query",
                  " · ".join(f"{idle[f'poll {n}']['per_s']:.0f}" for n in (ENGINE, ANALYST_PATH)
                             if f"poll {n}" in idle),
                  *(" · ".join(f"{s.latency[n]['polls_per_s']:.0f}" for n in s.latency) for s in stages))
    figures = [keel_cpu(s, idle) for s in stages]
    table.add_row("Keel + broker µs/command", "", *(f"{f['us_per_command']:,.0f}" for f in figures))
    table.add_row("CPU-bound ceiling /s", "", *(f"{f['ceiling_commands_per_s']:,.0f}" for f in figures))
    return table


# -- main -------------------------------------------------------------------------------


class StageFailed(Exception):
    """A stage could not finish (a service or a poller died): the run reports what it has and exits 1."""


@contextmanager
def interrupted_as_exit() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C does, through every cleanup."""
    def raise_interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(
    rate: float = typer.Option(1000, help="Commands/s of the latency stage (0 skips it)."),
    offered: str = typer.Option("5000", help="Comma-separated offered rates of the throughput stages, in order."),
    duration: float = typer.Option(20.0, help="Seconds each stage sends."),
    workers: int = typer.Option(2, help="Gateway worker processes (keel gateway --workers)."),
    processors: int = typer.Option(1, help="Processor workers (keel process, each supervised)."),
    connections: int = typer.Option(256, help="Keep-alive connections of the open-loop generator (pipelined)."),
    poll_ms: float = typer.Option(5.0, help="Least ms between the starts of two engine polls (latency stage)."),
    throughput_poll_ms: float = typer.Option(
        250.0, help="The same in the throughput stages, where each engine poll costs the projector's CPU "
                    "(a scan of the events' positions: ~7 ms at 120,000 rows, growing with the table)."),
    analyst_poll_ms: float = typer.Option(
        1000.0, help="Least ms between two rounds of GET /v1/query (one per tenant at once); 0: no analyst poller."),
    throughput_analyst: bool = typer.Option(
        False, "--throughput-analyst/--no-throughput-analyst",
        help="Keep the GET /v1/query poller in the throughput stages. It moves every row through the gateway's "
             "JSON, a heavier analyst than a deployment has (measured at 3,300 commands/s: 60 µs a command of "
             "the gateway's and the projector's CPU); those stages' figure is queryable in ClickHouse, which "
             "the engine poller measures."),
    raw_count: int = typer.Option(200_000, help="Messages of the raw Kafka baseline (0 skips it)."),
    drain_timeout: float = typer.Option(900.0, help="Seconds to wait after a stage for every command to be queryable."),
    keep: bool = typer.Option(False, help="Keep the data dir (service logs, outbox, chDB), even after an error."),
    json_only: bool = typer.Option(False, "--json-only", help="Print only the final JSON line."),
) -> None:
    """Run a whole deployment, drive it over HTTP and print the end-to-end figures."""
    global console
    console = status_console(json_only)
    rates = [float(r) for r in offered.split(",") if r.strip()]
    root = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    settings = Settings(data_dir=root, topic_prefix=unique_prefix("e2e"))
    env = environment(settings, AdminClient(admin_config(settings)))
    params = {"rate": rate, "offered": rates, "duration_s": duration, "gateway_workers": workers,
              "processors": processors, "connections": connections, "poll_ms": poll_ms,
              "throughput_poll_ms": throughput_poll_ms,
              "analyst_poll_ms": analyst_poll_ms, "throughput_analyst": throughput_analyst,
              "raw_count": raw_count, "topic_prefix": settings.topic_prefix,
              "outbox": "sqlite", "analytics": "chDB, served by the projector"}
    deployment = Deployment(settings, root, workers, processors)
    stages: list[Stage] = []
    idle: dict[str, dict[str, float]] = {}
    restarts: dict[str, int] = {}
    harness: Harness | None = None
    problems: list[str] = []
    types: Counter[str] = Counter()
    raw: float | None = None
    failed = False
    try:
        with interrupted_as_exit():
            console.print(f"deployment under {root}, topics {settings.topic_prefix}.*")
            harness = Harness.warmed_up(deployment, connections, poll_ms, analyst_poll_ms)
            console.print("idle: 10 s with the pollers only, to know the instrument's own cost…")
            idle = harness.idle(10.0)
            plan = ([("latency", rate)] if rate > 0 else []) + [(f"offered-{r:.0f}", r) for r in rates]
            for name, r in plan:
                if name != "latency" and not throughput_analyst:
                    harness.retire(ANALYST_PATH)
                console.print(f"stage {name}: {r:,.0f} commands/s for {duration:.0f} s…")
                try:
                    stage = harness.stage(name, r, duration, drain_timeout,
                                          (poll_ms if name == "latency" else throughput_poll_ms) / 1000)
                except RuntimeError as exc:  # a service or poller died: keep the figures so far
                    console.print(f"[red]stage {name} failed:[/red] {exc}")
                    raise StageFailed(f"stage {name} failed: {str(exc).splitlines()[0]}") from exc
                stages.append(stage)
                engine = stage.latency[ENGINE]
                console.print(f"  202 {stage.accepted_rate:,.0f}/s, queryable {stage.queryable_rate:,.0f}/s, "
                              f"p50 {engine['p50_ms']:,.0f} ms, p99 {engine['p99_ms']:,.0f} ms, "
                              f"drained in {stage.drain_s:.1f} s")
            console.print("checking every command in ClickHouse…")
            problems, types = exactly_once(settings, harness.runs)
            accepted = sum(run.accepted() for run in harness.runs)
            unanswered = sum(s.unanswered for s in stages)
            views = query_view_counts(deployment.port, deployment.analyst_tokens)
            distinct = sum(c for _, c in views.values())
            if not accepted <= distinct <= accepted + unanswered:
                problems.append(f"GET /v1/query sees {distinct:,} commands with events; {accepted:,} were accepted"
                                + (f" and {unanswered:,} never answered" if unanswered else ""))
            for poller in harness.pollers + harness.retired:
                if poller.foreign:
                    problems.append(f"the {poller.name} poller saw {poller.foreign:,} rows of no command of the run")
            for stage in stages:
                for name, figures in stage.latency.items():
                    if figures["not_seen"]:
                        problems.append(f"{stage.name}: {figures['not_seen']:,.0f} accepted commands never seen "
                                        f"by the {name} poller within {drain_timeout:.0f} s")
            harness.close()
            deployment.stop()
            if raw_count:
                console.print("raw baseline: produce of the same encoded commands…")
                raw = kafka_raw(settings, raw_count)
    except KeyboardInterrupt:
        failed = True
        console.print("[yellow]interrupted; cleaning up[/yellow]")
    except StageFailed as exc:
        failed = True
        problems.append(str(exc))
    except Exception:
        failed = True
        raise
    finally:
        if harness is not None:
            harness.stop.set()
            harness.close()
        deployment.stop()
        restarts = deployment.restarts()
        deployment.remove(keep)
    env["load_avg_1m_end"] = os.getloadavg()[0]
    ok = not problems and not failed
    throughput = [s for s in stages if s.name != "latency"]
    best = max(throughput, key=lambda s: s.queryable_rate, default=None)
    if not json_only:
        console.print(environment_table(env, params))
        console.print(stages_table(stages, raw))
        console.print(instrument_table(stages))
        console.print(cpu_table(stages, idle, os.cpu_count() or 1))
        console.print("event types: " + ", ".join(f"{k} {v:,}" for k, v in types.most_common()))
        console.print("workers ended by their watchdog and restarted: "
                      + (", ".join(f"{k} {v}" for k, v in restarts.items()) or "none"))
        console.print("services that ended and were started again: "
                      + ("; ".join(deployment.exits) if deployment.exits else "none"))
        if best is not None:
            console.print(f"sustained: {best.queryable_rate:,.0f} commands/s queryable at {best.offered_rate:,.0f} "
                          "offered, " + ("kept up (the pipeline can do more)" if best.kept_up
                                         else "backlog growing (saturated)"))
        console.print("exactly once: " + ("[green]every accepted command has exactly its events, once[/green]"
                                          if ok else "[red]" + "; ".join(problems or ["run failed"]) + "[/red]"))
    document = {"benchmark": "end_to_end", "ok": ok, "env": env, "params": params,
                "stages": [{**asdict(s), "keel_cpu": keel_cpu(s, idle)} for s in stages], "idle_cpu": idle,
                "raw_kafka_msgs_per_s": raw,
                "sustained_commands_per_s": best.queryable_rate if best else None,
                "poll_errors": {p.name: dict(p.errors) for p in harness.pollers} if harness else {},
                "event_types": dict(types), "watchdog_restarts": restarts,
                "service_exits": deployment.exits, "problems": problems}
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
