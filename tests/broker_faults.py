"""The platform under load while its only broker is SIGKILLed and restarted.

A gateway, a relay, two supervised processor workers and a supervised chainer run as
real processes on a private broker. Agents' commands go in over HTTP at a steady rate throughout; a
collector follows the events topic. Each cycle kills the broker, keeps it down for a
while, starts it again and times how long the processors take to decide a command sent
right after. Used by ``tests/integration/test_broker_restarts.py`` (bounded, in CI) and
``benchmarks/broker_restarts.py`` (longer); ``running_services`` runs the same platform on a
3-broker cluster for ``tests/integration/test_cluster_failures.py``.
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from keel.bootstrap import ensure_local_keys, trust_settings
from keel.cli.main import app
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.kafka.broker import paths_for, start_broker, stop_broker
from keel.kafka.clients import admin_config, consumer_config
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.supervision.progress import Heartbeat, heartbeat_path, liveness
from keel.trust.checkpoints import TrustedKeys
from keel.trust.store import read_audit
from keel.trust.verify import VerifyReport, verify_chain
from tests.processes import KeelProcess

AGGREGATES = 40
TRANSACTION_TIMEOUT_MS = 10_000
STALL_S = 20.0
WORKERS = ("w1", "w2")


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

    def stop(self) -> None:
        self._stop.set()
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
        answer = self._client.post("/v1/commands", json={"id": str(command_id), "aggregate_id": aggregate,
                                                         "on_behalf_of": "cust-1", **body})
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
        twice), each aggregate's versions in order, every worker live and deciding, the audit chain whole."""
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
        for worker in [*self.workers, self.chainer]:
            worker.assert_alive()
            assert "Traceback" not in worker.output(), worker.output()[-4000:]
        chain = self.chained("acme", bound_s)
        assert chain.ok, chain.summary()
        assert chain.records == sum(len(decided) for decided in events.values()), chain.summary()


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
def running_services(base: Settings, *, rate_per_s: float, partitions: int = 4, **env: str) -> Iterator[Platform]:
    """On the broker (or cluster) ``base`` names, with its data dir: fresh topics and keys, the processes
    (``env`` adds to or overrides their environment) and the collector; the processes stopped afterwards."""
    folder = base.data_dir
    settings = base.model_copy(update={
        "topic_partitions": partitions, "topic_prefix": f"faults-{uuid.uuid4().hex[:8]}",
        "kafka_transaction_timeout_ms": TRANSACTION_TIMEOUT_MS, "watchdog_stall_s": STALL_S})
    apply_topics(AdminClient(admin_config(settings)), declared_topics(settings))
    ensure_local_keys(settings)
    port = free_port()
    env = {"KEEL_DATA_DIR": str(folder), "KEEL_OUTBOX_DSN": f"sqlite:///{folder / 'outbox.sqlite3'}",
           "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
           "KEEL_KAFKA_PORT": str(settings.kafka_port), "KEEL_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
           "KEEL_KAFKA_TRANSACTION_TIMEOUT_MS": str(TRANSACTION_TIMEOUT_MS), "KEEL_WATCHDOG_STALL_S": str(STALL_S),
           "KEEL_PROCESSOR_SESSION_TIMEOUT_MS": "6000", "KEEL_RELAY_DELIVERY_TIMEOUT_S": "5", **env}
    token = _agent_key(env)
    gateway = KeelProcess(["gateway", "--port", str(port)], settings, folder / "gateway.log", **env)
    relay = KeelProcess(["relay"], settings, folder / "relay.log", **env)
    workers = [KeelProcess(["process", "--instance", name], settings, folder / f"processor-{name}.log", **env)
               for name in WORKERS]
    chainer = KeelProcess(["chain", "--instance", "c1"], settings, folder / "chainer.log", **env)
    collector = Collector(settings)
    load = Load(f"http://127.0.0.1:{port}", token, rate_per_s)
    processes = [gateway, relay, *workers, chainer]
    try:
        for process in processes:
            process.start()
        _wait_for_gateway(load, gateway)
        collector.start()
        yield Platform(settings, folder, gateway, relay, workers, chainer, load, collector)
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


def _wait_for_gateway(load: Load, gateway: KeelProcess) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{load.base}/healthz", timeout=1)
            return
        except httpx.TransportError:
            gateway.assert_alive()
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.2)
