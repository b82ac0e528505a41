"""The platform under load while its only broker is SIGKILLed and restarted.

A gateway, a relay, two supervised processor workers and a supervised chainer run as
real processes on a private broker. Agents' commands go in over HTTP at a steady rate throughout; a
collector follows the events topic. Each cycle kills the broker, keeps it down for a
while, starts it again and times how long the processors take to decide a command sent
right after. Used by ``tests/integration/test_broker_restarts.py`` (bounded, in CI) and
``benchmarks/broker_restarts.py`` (longer); ``running_services`` runs the same platform on a
3-broker cluster for ``tests/integration/test_cluster_failures.py`` and
``benchmarks/cluster_failures.py``, there with the projector (``keel project --follow`` on a
private chDB path) and a supervised effect worker calling a provider simulator, so their
exactly-once oracles run under node kills too: opt-in, since they cost a single-broker run
start-up time and CPU it does not need.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from clickhouse_connect.driver.exceptions import OperationalError
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from keel.bootstrap import ensure_local_keys, trust_settings
from keel.cli.main import app
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.effects import idempotency_key
from keel.domain.envelope import Envelope
from keel.domain.events import EffectCancelled, EffectFailed, EffectSucceeded
from keel.domains.registry import current
from keel.errors import KeelError
from keel.kafka.broker import paths_for, start_broker, stop_broker
from keel.kafka.clients import admin_config, consumer_config
from keel.kafka.cluster import (
    ClusterLayout,
    ClusterStatus,
    cluster_status,
    node_paths,
    plan_cluster,
    start_cluster,
    stop_cluster,
)
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.projector.clickhouse import connect
from keel.supervision.progress import Heartbeat, heartbeat_path, liveness
from keel.testing.provider import ProviderSimulator
from keel.trust.checkpoints import TrustedKeys
from keel.trust.store import read_audit
from keel.trust.verify import VerifyReport, verify_chain
from tests.processes import KeelProcess

AGGREGATES = 40
TRANSACTION_TIMEOUT_MS = 10_000
STALL_S = 20.0
WORKERS = ("w1", "w2")
STARTUP_BOUND_S = 180.0
"""How long the gateway and the projector may take to serve: starting a dozen processes at once on a
busy machine takes minutes, and a bound only matters when they never do."""
EFFECTS_INSTANCE = "e1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Collector:
    """Follows the events topic from its start, across broker restarts."""

    settings: Settings
    events: dict[uuid.UUID, list[Envelope]] = field(default_factory=lambda: defaultdict(list))
    seen_at: dict[uuid.UUID, float] = field(default_factory=dict)
    by_key: dict[str, list[Envelope]] = field(default_factory=lambda: defaultdict(list))
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="collector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _follow(self) -> None:
        codec, topic = EnvelopeCodec(), topic_name(self.settings, Topic.EVENTS)
        consumer = Consumer(consumer_config(self.settings, f"{self.settings.topic_prefix}.collector",
                                            log_level=0))  # its refused connections are expected
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                         for p in range(self.settings.topic_partitions)])
        try:
            while not self._stop.is_set():
                for message in consumer.consume(1000, 0.2):
                    if message.error() is not None:  # end of a partition, or a broker away: read on
                        continue
                    event = codec.decode(message.value() or b"")
                    with self._lock:
                        if event.causation_id is not None:
                            self.events[event.causation_id].append(event)
                            self.seen_at.setdefault(event.causation_id, time.monotonic())
                        self.by_key[event.key].append(event)
        finally:
            consumer.close()

    def decided(self, command_id: uuid.UUID) -> float | None:
        """When the first event of ``command_id`` arrived (monotonic), if it did."""
        with self._lock:
            return self.seen_at.get(command_id)

    def seen(self) -> list[Envelope]:
        """Every event read so far."""
        with self._lock:
            return [e for in_order in self.by_key.values() for e in in_order]

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # a platform that failed to start never started it
            self._thread.join(timeout=30)


@dataclass
class Load:
    """Agents' commands over HTTP at a steady rate; remembers what the gateway acknowledged."""

    base: str
    token: str
    rate_per_s: float
    accepted: list[uuid.UUID] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    _sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._client = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"},
                                    timeout=30)
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def submit(self) -> uuid.UUID | None:
        """Send the next command; its id once acknowledged (202), else ``None``."""
        index, self._sent = self._sent, self._sent + 1
        aggregate = f"sub-{index % AGGREGATES}"
        if index < AGGREGATES:
            body = {"type": "StartSubscription", "payload": {"customer_id": "cust-1", "plan": "pro",
                                                             "monthly_price_cents": 10**9, "currency": "EUR"}}
        else:
            body = {"type": "IssueRefund", "payload": {"amount_cents": 1, "currency": "EUR", "reason": "load"}}
        command_id = uuid.uuid4()
        try:
            answer = self._client.post("/v1/commands", json={"id": str(command_id), "aggregate_id": aggregate,
                                                             "on_behalf_of": "cust-1", **body})
        except httpx.TransportError as exc:  # no answer: whether the gateway took it is unknown
            self.refused.append(f"no answer: {exc!r}")
            return None
        if answer.status_code != 202:
            self.refused.append(f"{answer.status_code} {answer.text[:200]}")
            return None
        self.accepted.append(command_id)
        return command_id

    def _run(self) -> None:
        interval = 1.0 / self.rate_per_s
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.submit()
            next_at += interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # a platform that failed to start never started it
            self._thread.join(timeout=60)


@dataclass
class Platform:
    """The running processes, the load and the collector of one fault run."""

    settings: Settings
    folder: Path
    gateway: KeelProcess
    relay: KeelProcess
    workers: list[KeelProcess]
    chainer: KeelProcess
    load: Load
    collector: Collector
    projector: KeelProcess | None = None
    effects: KeelProcess | None = None
    provider: ProviderSimulator | None = None
    resumes_s: list[float] = field(default_factory=list)

    def kill_broker(self) -> None:
        """SIGKILL the broker, as a crash would."""
        pid = int(paths_for(self.settings).pid_file.read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart_broker_after(self, down_s: float, resume_bound_s: float) -> float:
        """Keep the broker down ``down_s``, start it, and return how long a fresh command took to be decided."""
        time.sleep(down_s)
        start_broker(self.settings)
        resumed = self.time_a_decision(resume_bound_s)
        self.resumes_s.append(resumed)
        return resumed

    def time_a_decision(self, bound_s: float) -> float:
        """Send one command now; how long until its event was seen (fails after ``bound_s``)."""
        started = time.monotonic()
        probe = self.load.submit()
        assert probe is not None, f"the gateway refused a command: {self.load.refused[-1:]}"
        while (decided := self.collector.decided(probe)) is None:
            if time.monotonic() - started > bound_s:
                raise AssertionError(f"no decision within {bound_s:.0f}s; logs:\n"
                                     + "\n".join(w.output()[-3000:] for w in self.workers))
            time.sleep(0.1)
        return decided - started

    def wait_until_decided(self, bound_s: float) -> list[uuid.UUID]:
        """Wait until every acknowledged command has an event; the ids still undecided after ``bound_s``."""
        deadline = time.monotonic() + bound_s
        while True:
            missing = [c for c in self.load.accepted if self.collector.decided(c) is None]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.5)

    def worker_health(self) -> dict[str, tuple[str | None, int]]:
        """Each processor worker's liveness problem (``None``: live) and partition count."""
        health = {}
        for name in WORKERS:
            beat = Heartbeat.read(heartbeat_path(self.settings, "processor", name))
            health[name] = (liveness(beat, time.time(), 10.0), beat.partitions if beat else 0)
        return health

    def chained(self, tenant: str, bound_s: float) -> VerifyReport:
        """The tenant's audit chain, verified, once it holds one record per event seen (or after ``bound_s``)."""
        events = sum(len(decided) for decided in self.collector.events.values())
        trusted = TrustedKeys.from_settings(trust_settings(self.settings))
        deadline = time.monotonic() + bound_s
        while True:
            audit = read_audit(self.settings, tenant)
            report = verify_chain(tenant, audit.records, audit.checkpoints, trusted)
            if report.records >= events or time.monotonic() > deadline:
                return report
            time.sleep(1.0)

    def settled_health(self, bound_s: float) -> dict[str, tuple[str | None, int]]:
        """The workers' health once every one is live and holds partitions, or as it is after ``bound_s``."""
        deadline = time.monotonic() + bound_s
        while True:
            health = self.worker_health()
            settled = all(problem is None and partitions > 0 for problem, partitions in health.values())
            if settled or time.monotonic() > deadline:
                return health
            time.sleep(0.5)


    def assert_every_command_decided_once(self, missing: list[uuid.UUID],
                                          health: dict[str, tuple[str | None, int]], bound_s: float) -> None:
        """The oracle of a fault run: every acknowledged command decided exactly once (no event written
        twice), each aggregate's versions in order, every process running and every worker deciding, the
        audit chain whole."""
        logs = "\n".join(w.output()[-4000:] for w in self.workers)
        assert missing == [], f"{len(missing)} acknowledged commands were never decided:\n{logs}"
        events = self.collector.events
        assert all(len(events[c]) == 1 for c in self.load.accepted), "a command was decided twice"
        ids = Counter(e.id for decided in events.values() for e in decided)
        assert ids.most_common(1)[0][1] == 1, "an event was written twice"
        for key, in_order in self.collector.by_key.items():
            versions = [e.version for e in in_order if e.version is not None]
            assert versions == list(range(1, len(versions) + 1)), f"{key} lost its order: {versions}"
        for name, (problem, partitions) in health.items():
            assert problem is None and partitions > 0, f"worker {name} is not deciding ({problem}):\n{logs}"
        self.gateway.assert_alive()
        self.relay.assert_alive()
        for worker in [*self.workers, self.chainer, *(p for p in (self.projector, self.effects) if p is not None)]:
            worker.assert_alive()
            assert "Traceback" not in worker.output(), worker.output()[-4000:]
        chain = self.chained("acme", bound_s)
        assert chain.ok, chain.summary()
        assert chain.records == sum(len(decided) for decided in events.values()), chain.summary()

    def projected_since(self, since: float) -> float | None:
        """When (wall clock) the projector first wrote the row of an event decided after ``since``; ``None``
        while it has not, or its engine did not answer this time (a busy machine: the caller asks again).
        Rows of events decided before could be a backlog read from partitions whose leader lived on."""
        try:
            client = connect(self.settings, may_host=False)  # the projector owns the engine: ask it, never take it
        except KeelError:
            return None
        try:
            micros = client.query("SELECT toUnixTimestamp64Micro(minOrNull(_projected_at)) FROM events "
                                  "WHERE occurred_at > fromUnixTimestamp64Micro({since:Int64}, 'UTC')",
                                  parameters={"since": int(since * 1e6)}).result_rows[0][0]
        except OperationalError:
            return None
        finally:
            client.close()
        return None if micros is None else int(micros) / 1e6

    def assert_projected_equals_topic(self, bound_s: float) -> int:
        """ClickHouse's ``events`` holds every committed record of the events topic exactly once, at its
        partition and offset, and nothing else (waiting up to ``bound_s`` for the projector to catch up);
        returns the number of events."""
        assert self.projector is not None, "the platform runs no projector"
        codec, topic = EnvelopeCodec(), topic_name(self.settings, Topic.EVENTS)
        in_topic = {str(codec.decode(m.value() or b"").id): (m.partition(), m.offset())
                    for m in read_to_end(self.settings, topic, timeout_s=60)}
        deadline = time.monotonic() + bound_s
        while True:
            client = connect(self.settings, may_host=False)
            try:
                rows = client.query("SELECT toString(event_id), _partition, _offset FROM events").result_rows
            finally:
                client.close()
            if len(rows) >= len(in_topic) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        projected = {str(r[0]): (int(r[1]), int(r[2])) for r in rows}
        assert len(rows) == len(projected), f"{len(rows) - len(projected)} events are in ClickHouse twice"
        lost = in_topic.keys() - projected.keys()
        extra = projected.keys() - in_topic.keys()
        assert not lost and not extra, (f"{len(lost)} events of the topic are not in ClickHouse, {len(extra)} rows "
                                        f"are in no record of it:\n{self.projector.output()[-4000:]}")
        assert projected == in_topic, "a row's partition or offset is not its record's"
        self.projector.assert_alive()
        return len(in_topic)

    def effects_settled(self, bound_s: float) -> tuple[dict[uuid.UUID, Envelope], list[Envelope]]:
        """The events that open an effect, by id, and the effects' recorded outcomes, once every effect has
        an outcome (or as they are after ``bound_s``)."""
        triggers = set(current().effect_of)
        deadline = time.monotonic() + bound_s
        while True:
            seen = self.collector.seen()
            effects = {e.id: e for e in seen if e.type in triggers}
            outcomes = [e for e in seen if isinstance(e.payload, (EffectSucceeded, EffectFailed, EffectCancelled))]
            settled = {o.payload.effect_id for o in outcomes}  # type: ignore[attr-defined]
            if effects.keys() <= settled or time.monotonic() > deadline:
                return effects, outcomes
            time.sleep(1.0)

    def assert_effects_once(self, bound_s: float) -> int:
        """Every decided effect has exactly one outcome, ``EffectSucceeded``, and the provider performed it
        exactly once under its idempotency key, and nothing else; returns the number of effects."""
        assert self.effects is not None and self.provider is not None, "the platform runs no effect worker"
        effects, outcomes = self.effects_settled(bound_s)
        assert effects, "the load decided no effect"
        per_effect = Counter(o.payload.effect_id for o in outcomes)  # type: ignore[attr-defined]
        logs = self.effects.output()[-4000:]
        assert per_effect.keys() == effects.keys(), (
            f"{len(effects.keys() - per_effect.keys())} effects have no outcome, "
            f"{len(per_effect.keys() - effects.keys())} outcomes name no effect:\n{logs}")
        assert [i for i, n in per_effect.items() if n > 1] == [], "an effect has two recorded outcomes"
        failed = [o.payload for o in outcomes if not isinstance(o.payload, EffectSucceeded)]
        assert failed == [], f"{len(failed)} effects did not succeed, e.g. {failed[:3]}"
        performed = self.provider.performed()
        assert performed.keys() == {idempotency_key(i) for i in effects}, "the provider performed something else"
        assert [k for k, a in performed.items() if a.count != 1] == [], "an effect was performed twice"
        self.effects.assert_alive()
        return len(effects)


@contextmanager
def running_cluster(folder: Path) -> Iterator[tuple[Settings, ClusterLayout]]:
    """A private 3-node cluster (``keel.kafka.cluster``) on free ports under ``folder``, RF 3 and
    ``min.insync.replicas`` 2; every node stopped afterwards, whatever happened."""
    base = Settings(data_dir=folder, kafka_start_timeout_s=120.0)
    layout = plan_cluster(base, 3, [(free_port(), free_port()) for _ in range(3)])
    settings = base.model_copy(update={"kafka_bootstrap": layout.bootstrap, "replication_factor": 3,
                                       "min_insync_replicas": 2})
    try:
        start_cluster(settings, layout)
        yield settings, layout
    finally:
        stop_cluster(settings, layout)


def kill_node(settings: Settings, node_id: int) -> float:
    """SIGKILL node ``node_id``, as a crash would; the wall-clock time of the kill."""
    pid = int(node_paths(settings, node_id).pid_file.read_text())
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed_at


def in_sync(settings: Settings, layout: ClusterLayout, bound_s: float) -> ClusterStatus:
    """The status once every node serves and no partition is under-replicated (or as it is after ``bound_s``)."""
    deadline = time.monotonic() + bound_s
    while True:
        status = cluster_status(settings, layout)
        if status.healthy or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def resumes(platform: Platform, killed_at: float, bound_s: float) -> dict[str, float | None]:
    """Seconds from ``killed_at`` until each committing worker's next commit, until the projector wrote
    the row of an event decided after the kill, and until a command sent right after the kill was decided
    (``end-to-end``); ``None`` for what did not resume within ``bound_s``."""
    workers = {f"processor {name}": heartbeat_path(platform.settings, "processor", name) for name in WORKERS}
    workers["chainer c1"] = heartbeat_path(platform.settings, "chainer", "c1")
    if platform.effects is not None:
        workers[f"effects {EFFECTS_INSTANCE}"] = heartbeat_path(platform.settings, "effects", EFFECTS_INSTANCE)
    found: dict[str, float | None] = {name: None for name in [*workers, "end-to-end"]}
    if platform.projector is not None:
        found["projector"] = None
    sent, since_kill = time.monotonic(), time.time() - killed_at
    probe = platform.load.submit()
    assert probe is not None, f"the gateway refused a command: {platform.load.refused[-1:]}"
    deadline = sent + bound_s
    while time.monotonic() < deadline and None in found.values():
        for name, path in workers.items():
            beat = Heartbeat.read(path)
            if found[name] is None and beat is not None and beat.last_commit_age_s is not None:
                committed_at = beat.written_at - beat.last_commit_age_s
                if committed_at > killed_at:
                    found[name] = round(committed_at - killed_at, 1)
        decided = platform.collector.decided(probe)
        if found["end-to-end"] is None and decided is not None:
            found["end-to-end"] = round(decided - sent + since_kill, 1)
        if platform.projector is not None and found["projector"] is None:
            projected_at = platform.projected_since(killed_at)
            if projected_at is not None:
                found["projector"] = round(projected_at - killed_at, 1)
        time.sleep(0.2)
    return found


def cycle_node(settings: Settings, layout: ClusterLayout, platform: Platform, node_id: int, *, down_s: float,
               resume_bound_s: float, in_sync_bound_s: float) -> tuple[bool, dict[str, float | None]]:
    """SIGKILL node ``node_id`` of the cluster ``platform`` runs on, keep it down ``down_s``, start it again
    and wait until every partition is back in sync; whether it was the active controller, and ``resumes``."""
    controller = cluster_status(settings, layout).active_controller == node_id
    killed_at = kill_node(settings, node_id)
    measured: dict[str, float | None] = {}
    measuring = threading.Thread(target=lambda: measured.update(resumes(platform, killed_at, resume_bound_s)))
    measuring.start()
    time.sleep(down_s)
    during = cluster_status(settings, layout)
    assert not during.quorum_lost and during.active_controller not in (None, node_id), during.detail
    start_cluster(settings, layout)
    back = in_sync(settings, layout, in_sync_bound_s)
    assert back.healthy, f"after node {node_id} came back: {back.detail}"
    measuring.join()
    return controller, measured


def print_resumes(figures: list[tuple[int, bool, dict[str, float | None]]]) -> None:
    """One line per kill: how long after it each service resumed."""
    for node_id, controller, measured in figures:
        print(f"killed node {node_id}{' (active controller)' if controller else ''}: resumed after "
              + ", ".join(f"{name} {'never' if s is None else f'{s}s'}" for name, s in measured.items()))


@contextmanager
def running_platform(base: Settings, folder: Path, *, rate_per_s: float, partitions: int = 4) -> Iterator[Platform]:
    """A private broker, its topics and keys, the processes and the collector; all stopped afterwards."""
    settings = base.model_copy(update={
        "data_dir": folder, "kafka_port": free_port(), "kafka_controller_port": free_port(), "kafka_bootstrap": None})
    start_broker(settings)
    try:
        with running_services(settings, rate_per_s=rate_per_s, partitions=partitions) as platform:
            yield platform
    finally:
        stop_broker(settings)


@contextmanager
def running_services(base: Settings, *, rate_per_s: float, partitions: int = 4, projector: bool = False,
                     effects: bool = False, **env: str) -> Iterator[Platform]:
    """On the broker (or cluster) ``base`` names, with its data dir: fresh topics and keys, the processes
    (``env`` adds to or overrides their environment) and the collector; the processes stopped afterwards.
    ``projector`` adds ``keel project --follow`` (into a database of this run's own); ``effects`` a
    supervised effect worker and the provider simulator it calls."""
    folder = base.data_dir
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    settings = base.model_copy(update={
        "topic_partitions": partitions, "topic_prefix": prefix, "clickhouse_database": prefix.replace("-", "_"),
        "kafka_transaction_timeout_ms": TRANSACTION_TIMEOUT_MS, "watchdog_stall_s": STALL_S})
    apply_topics(AdminClient(admin_config(settings)), declared_topics(settings))
    ensure_local_keys(settings)
    port = free_port()
    env = {"KEEL_DATA_DIR": str(folder), "KEEL_OUTBOX_DSN": f"sqlite:///{folder / 'outbox.sqlite3'}",
           "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
           "KEEL_KAFKA_PORT": str(settings.kafka_port), "KEEL_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
           "KEEL_KAFKA_TRANSACTION_TIMEOUT_MS": str(TRANSACTION_TIMEOUT_MS), "KEEL_WATCHDOG_STALL_S": str(STALL_S),
           "KEEL_PROCESSOR_SESSION_TIMEOUT_MS": "6000", "KEEL_RELAY_DELIVERY_TIMEOUT_S": "5",
           "KEEL_CLICKHOUSE_DATABASE": settings.clickhouse_database, **env}
    token = _agent_key(env)
    gateway = KeelProcess(["gateway", "--port", str(port)], settings, folder / "gateway.log", **env)
    relay = KeelProcess(["relay"], settings, folder / "relay.log", **env)
    workers = [KeelProcess(["process", "--instance", name], settings, folder / f"processor-{name}.log", **env)
               for name in WORKERS]
    chainer = KeelProcess(["chain", "--instance", "c1"], settings, folder / "chainer.log", **env)
    projecting = KeelProcess(["project", "--follow"], settings, folder / "projector.log", **env) if projector else None
    collector = Collector(settings)
    load = Load(f"http://127.0.0.1:{port}", token, rate_per_s)
    with ExitStack() as stack:
        provider = stack.enter_context(ProviderSimulator()) if effects else None
        effecting = None if provider is None else KeelProcess(
            ["effects", "run", "--instance", EFFECTS_INSTANCE], settings, folder / "effects.log", **env,
            SUPPORT_DESK_PAYMENTS_URL=provider.url, SUPPORT_DESK_EMAIL_URL=provider.url,
            DEPLOYS_TARGET_URL=provider.url)
        processes = [gateway, relay, *workers, chainer, *(p for p in (projecting, effecting) if p is not None)]
        try:
            for process in processes:
                process.start()
            _wait_for_gateway(load, gateway)
            if projecting is not None:
                _wait_for_engine(settings, projecting)
            collector.start()
            yield Platform(settings, folder, gateway, relay, workers, chainer, load, collector,
                           projecting, effecting, provider)
        finally:
            load.stop()
            for process in processes:
                process.stop(grace_s=40)
            collector.stop()


def _agent_key(env: dict[str, str]) -> str:
    runner = CliRunner()
    made = runner.invoke(app, ["tenants", "create", "acme", "--no-kafka"], env=env)
    assert made.exit_code == 0, made.output
    made = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--actor", "agent:support-bot",
                               "--role", "support-agent"], env=env)
    assert made.exit_code == 0, made.output
    found = re.search(r"keel_[0-9a-f]{16}_\S+", made.output)
    assert found is not None, made.output
    return found.group(0)


def _wait_for_engine(settings: Settings, projector: KeelProcess) -> None:
    """Until the projector has applied its migrations and serves its engine to this process."""
    deadline = time.monotonic() + STARTUP_BOUND_S
    while True:
        try:
            connect(settings, may_host=False).close()
            return
        except KeelError:
            projector.assert_alive()
            assert time.monotonic() < deadline, "the projector did not serve its engine:\n" + projector.output()[-3000:]
            time.sleep(0.5)


def _wait_for_gateway(load: Load, gateway: KeelProcess) -> None:
    deadline = time.monotonic() + STARTUP_BOUND_S
    while True:
        try:
            httpx.get(f"{load.base}/healthz", timeout=1)
            return
        except httpx.TransportError:
            gateway.assert_alive()
            assert time.monotonic() < deadline, "the gateway did not start:\n" + gateway.output()[-3000:]
            time.sleep(0.2)
