"""Shared helpers of the benchmarks: the reference workload, environment, throwaway topics and
groups, batch clocks, output.

Benchmarks print figures and never judge them: the only failures are lost messages, failed
cross-checks and infrastructure errors. Every topic and consumer group a run creates has a
unique name and is deleted at the end, so runs can overlap with tests and with each other.
"""

from __future__ import annotations

import atexit
import cProfile
import json
import os
import pstats
import platform
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import confluent_kafka
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from rich.console import Console
from rich.table import Table

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind, Authority, DelegationLink, Envelope, Payload, new_command
from support_desk.messages import CancelSubscription, IssueRefund, SendEmail, StartSubscription
from keel.kafka.broker import broker_status, paths_for
from keel.kafka.cluster import node_paths, recorded_cluster
from keel.kafka.reader import read_to_end, record_headers

_VERSION_LINE = re.compile(rb"Kafka version: (\S+)")

TENANTS = ("acme", "globex", "initech", "umbrella")
STORY_LENGTH = 5  # commands per aggregate in the reference workload, one of them rejected
BILLING = Actor(kind=ActorKind.SERVICE, id="billing")
AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
LEAD = DelegationLink(actor=Actor(kind=ActorKind.HUMAN, id="jane.lead"), reason="customer asked to cancel")


def unique_prefix(benchmark: str) -> str:
    """A topic/group prefix no other run uses."""
    return f"bench-{benchmark}-{uuid.uuid4().hex[:8]}"


def private_keys() -> None:
    """Give this benchmark, and every process it starts, a throwaway master key and key store.

    The processor and the SDK seal personal fields as in production, so they create data keys;
    without this they would go to the user's ``.keel/keys.db`` (and trip the test suite's guard on
    it). Set through the ``KEEL_*`` variables child processes inherit; a key setting the user made
    wins. The folder is removed when the benchmark ends.
    """
    if os.environ.get("KEEL_MASTER_KEY_FILE") or os.environ.get("KEEL_KEYSTORE_DSN"):
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-keys-"))
    atexit.register(shutil.rmtree, folder, True)
    master = folder / "master.key"
    master.write_bytes(os.urandom(32))
    master.chmod(0o600)
    os.environ["KEEL_MASTER_KEY_FILE"] = str(master)
    os.environ["KEEL_KEYSTORE_DSN"] = f"sqlite:///{folder / 'keys.db'}"


# -- the reference workload -------------------------------------------------------------


def story(tenant: str, aggregate: str, price: int) -> list[Envelope]:
    """Five commands on one subscription; the oversized refund is rejected by the domain."""
    customer = f"cust-{aggregate}"

    def by_agent(payload: Payload) -> Envelope:
        return new_command(payload, tenant_id=tenant, aggregate_id=aggregate, actor=AGENT,
                           on_behalf_of=customer, delegation=(LEAD,),
                           authority=Authority(role="support-agent"))

    return [
        new_command(StartSubscription(customer_id=customer, plan="pro", monthly_price_cents=price,
                                      currency="EUR"),
                    tenant_id=tenant, aggregate_id=aggregate, actor=BILLING,
                    authority=Authority(role="billing-service")),
        by_agent(IssueRefund(amount_cents=price // 2, currency="EUR", reason="unused half month",
                             confidence=0.93)),
        # Sure enough for the default policy to let it through; the domain rejects it.
        by_agent(IssueRefund(amount_cents=price * 2, currency="EUR", reason="goodwill", confidence=0.8)),
        by_agent(SendEmail(to_address=f"{customer}@example.com", template="refund-issued")),
        by_agent(CancelSubscription(reason="customer request")),
    ]


def reference_commands(aggregates: int) -> list[Envelope]:
    """Stories of ``aggregates`` subscriptions across the tenants, interleaved step by step.

    Interleaving puts many aggregates in every batch; each aggregate's own commands keep
    their order because one key always lands on one partition.
    """
    stories = [story(TENANTS[i % len(TENANTS)], f"sub-{i}", 1000 + i % 9000) for i in range(aggregates)]
    return [s[step] for step in range(STORY_LENGTH) for s in stories]


# -- environment ------------------------------------------------------------------------


def broker_version(settings: Settings) -> str:
    """The brokers' version: from their start-up logs when `keel up` runs them (one broker, or the
    private cluster the data dir records when the run uses it), else from the jars."""
    cluster = recorded_cluster(settings)
    if cluster is not None and settings.bootstrap_servers == cluster.bootstrap:
        versions = {version for node in cluster.nodes if (version := _logged_version(
            node_paths(settings, node.node_id).server_log)) is not None}
        if versions:
            return f"{', '.join(sorted(versions))} (logs of a {len(cluster.nodes)}-node cluster)"
    elif broker_status(settings).running:
        version = _logged_version(paths_for(settings).server_log)
        if version is not None:
            return f"{version} (broker log)"
    jars = sorted((settings.kafka_home / "libs").glob("kafka_2.13-*.jar"))
    if jars:
        return f"{jars[-1].stem.removeprefix('kafka_2.13-')} (local jars; broker not started by keel)"
    return "unknown"


def _logged_version(log: Path) -> str | None:
    """The version the broker's latest start wrote into ``log``."""
    found = _VERSION_LINE.findall(log.read_bytes()) if log.exists() else []
    return found[-1].decode() if found else None


def environment(settings: Settings, admin: AdminClient) -> dict[str, Any]:
    """What the figures depend on: versions, cores, load, broker."""
    metadata = admin.list_topics(timeout=10)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "broker": broker_version(settings),
        "bootstrap": settings.bootstrap_servers,
        "brokers": len(metadata.brokers),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_avg_1m_start": os.getloadavg()[0],
    }


# -- topics and groups ------------------------------------------------------------------


def create_topics(admin: AdminClient, names: Iterable[str], partitions: int, replication_factor: int = 1) -> None:
    """Create fresh topics; replication factor 1 suits the single local broker, a cluster's run
    passes its own so the raw baseline replicates like Keel's topics (``min.insync.replicas``
    is the broker's default)."""
    futures = admin.create_topics([NewTopic(n, partitions, replication_factor) for n in names],
                                  operation_timeout=30)
    for future in futures.values():
        future.result()


def delete_topics(admin: AdminClient, names: Sequence[str]) -> list[str]:
    """Delete topics; returns the problems instead of raising, so cleanup goes on."""
    if not names:
        return []
    problems = []
    for name, future in admin.delete_topics(list(names), operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() != "UNKNOWN_TOPIC_OR_PART":
                problems.append(f"topic {name}: {exc}")
    return problems


def delete_groups(admin: AdminClient, groups: Sequence[str]) -> list[str]:
    """Delete consumer groups; a group that never committed does not exist, which is fine."""
    if not groups:
        return []
    problems = []
    for group, future in admin.delete_consumer_groups(list(groups), request_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() not in ("GROUP_ID_NOT_FOUND", "_NOENT"):
                problems.append(f"group {group}: {exc}")
    return problems


def committed_total(admin: AdminClient, group: str) -> int:
    """The sum of a group's committed offsets over every partition it committed."""
    request = [ConsumerGroupTopicPartitions(group)]
    result = admin.list_consumer_group_offsets(request, request_timeout=30)[group].result()
    return sum(max(tp.offset, 0) for tp in result.topic_partitions or [])


def high_watermarks_total(consumer: confluent_kafka.Consumer, topic: str) -> int:
    """The sum of a topic's high watermarks (its record count when fresh and non-transactional)."""
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)


def record_types(settings: Settings, topic: str) -> Counter[str]:
    """How many committed records of each ``keel-type`` header ``topic`` holds."""
    return Counter((dict(record_headers(m)).get("keel-type") or b"?").decode() for m in read_to_end(settings, topic))


def next_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    """The offsets to commit after ``messages``: one past the last of each partition."""
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic() or "", m.partition() or 0)
        last[key] = max(last.get(key, -1), m.offset() or 0)
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]


def mismatches(*checks: tuple[str, int, int]) -> tuple[str, ...]:
    """Each ``(what, got, want)`` that disagrees, as a readable line."""
    return tuple(f"{what}: {got:,}, expected {want:,}" for what, got, want in checks if got != want)


# -- timing -----------------------------------------------------------------------------


class Mark(NamedTuple):
    """A point in a stage: wall clock, this process's CPU time (all threads), messages done."""

    wall: float
    cpu: float
    total: int


def now_mark(total: int) -> Mark:
    """A mark for ``total`` messages done, now."""
    return Mark(time.perf_counter(), time.process_time(), total)


@dataclass
class BatchClock:
    """Marks at the end of each batch, to time a stage without its start-up."""

    start: Mark = field(default_factory=lambda: now_mark(0))
    marks: list[Mark] = field(default_factory=list)

    def mark(self, total: int) -> None:
        """Record that ``total`` messages are done, now."""
        self.marks.append(now_mark(total))

    @property
    def total(self) -> int:
        """Messages done so far."""
        return self.marks[-1].total if self.marks else 0

    def window(self) -> tuple[Mark, Mark]:
        """The timed window: end of the first batch to end of the last (from the start if one batch)."""
        if not self.marks:
            return self.start, self.start
        return (self.marks[0] if len(self.marks) > 1 else self.start), self.marks[-1]


@dataclass(frozen=True)
class StageResult:
    """One stage's figures; ``rate`` is over the timed window, which ``timed`` describes."""

    stage: str
    label: str
    expected: int
    done: int
    timed_messages: int
    seconds: float
    rate: float
    rate_incl_start: float
    mb_per_s: float | None
    cpu_us_per_message: float
    batches: int
    timed: str
    detail: str = ""
    anomalies: tuple[str, ...] = ()

    @property
    def lost(self) -> int:
        """Messages the stage should have handled and did not."""
        return self.expected - self.done

    @property
    def ok(self) -> bool:
        """Nothing lost and every cross-check agreed."""
        return not self.lost and not self.anomalies


def window_result(stage: str, label: str, expected: int, done: int, first: Mark, last: Mark, *,
                  start: Mark, message_bytes: int | None, batches: int, timed: str, detail: str = "",
                  anomalies: tuple[str, ...] = ()) -> StageResult:
    """Figures of the window ``first``..``last``; ``start`` gives the rate with start-up included."""
    messages, seconds = last.total - first.total, last.wall - first.wall
    rate = messages / seconds if seconds > 0 else 0.0
    overall_s = last.wall - start.wall
    return StageResult(
        stage=stage, label=label, expected=expected, done=done, timed_messages=messages,
        seconds=seconds, rate=rate, rate_incl_start=last.total / overall_s if overall_s > 0 else 0.0,
        mb_per_s=rate * message_bytes / 1e6 if message_bytes else None,
        cpu_us_per_message=(last.cpu - first.cpu) / messages * 1e6 if messages else 0.0,
        batches=batches, timed=timed, detail=detail, anomalies=anomalies,
    )


def stage_result(stage: str, label: str, expected: int, clock: BatchClock, *, message_bytes: int | None,
                 timed: str, detail: str = "", anomalies: tuple[str, ...] = ()) -> StageResult:
    """Figures of a batch-timed stage: the rate excludes the first batch (and the group join)."""
    first, last = clock.window()
    if len(clock.marks) < 2:  # one batch: nothing to time without the start-up
        timed = "start (1 batch only)"
    return window_result(stage, label, expected, clock.total, first, last, start=clock.start,
                         message_bytes=message_bytes, batches=len(clock.marks), timed=timed,
                         detail=detail, anomalies=anomalies)


# -- CPU of other processes ---------------------------------------------------------------


def process_tree_cpu(roots: dict[str, int]) -> dict[str, float]:
    """User plus system CPU seconds of each named process and all its descendants, from ``/proc``.

    One scan of ``/proc`` serves every root, so samples of several services are taken at the
    same moment. A descendant that is itself one of the roots counts only under its own name
    (a harness that started the services it measures counts only itself). A process that
    exited (or a root that is gone) counts as what is left of it.
    """
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    totals, named = {}, set(roots.values())
    for name, root in roots.items():
        total, pending = 0.0, [root]
        while pending:
            pid = pending.pop()
            total += times.get(pid, 0.0)
            pending += [child for child in children.get(pid, []) if child not in named]
        totals[name] = total
    return totals


def listening_pid(port: int) -> int | None:
    """The process listening on local TCP ``port`` (the broker's JVM, however it was started), if visible."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in rows.readlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and inodes:
            try:
                if any(os.readlink(fd.path) in inodes for fd in os.scandir(f"/proc/{entry.name}/fd")):
                    return int(entry.name)
            except OSError:
                continue
    return None


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (``/proc/stat``: all but idle, iowait
    and steal). Steal is time the hypervisor gave another guest while this one had work: not this
    machine's work, though its slow phases are mostly that (``machine_stolen_seconds``)."""
    fields = _cpu_fields()
    return (sum(fields[:7]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def machine_stolen_seconds() -> float:
    """CPU seconds the hypervisor took from this machine's cores since boot (``/proc/stat``'s steal)."""
    return _cpu_fields()[7] / os.sysconf("SC_CLK_TCK")


def _cpu_fields() -> list[int]:
    """``/proc/stat``'s first line: user, nice, system, idle, iowait, irq, softirq, steal, ..."""
    with open("/proc/stat") as stat:
        return [int(v) for v in stat.readline().split()[1:]]


# -- output -----------------------------------------------------------------------------


def results_table(title: str, results: Sequence[StageResult]) -> Table:
    """The figures as a rich table."""
    table = Table(title=title)
    table.add_column("stage")
    for column in ("done", "timed s", "msgs/s", "MB/s", "incl. start", "CPU µs/msg"):
        table.add_column(column, justify="right")
    table.add_column("timed from")
    for r in results:
        done = f"{r.done:,}" if r.ok else f"[red]{r.done:,} of {r.expected:,}[/red]"
        table.add_row(r.stage, done, f"{r.seconds:.2f}", f"{r.rate:,.0f}",
                      f"{r.mb_per_s:.1f}" if r.mb_per_s is not None else "-",
                      f"{r.rate_incl_start:,.0f}", f"{r.cpu_us_per_message:.1f}", r.timed)
    return table


def environment_table(env: dict[str, Any], params: dict[str, Any]) -> Table:
    """The environment and parameters as a two-column table."""
    table = Table(title="environment and parameters", show_header=False)
    table.add_column("key")
    table.add_column("value")
    for key, value in {**env, **params}.items():
        table.add_row(key, str(value))
    return table


def print_json_line(benchmark: str, env: dict[str, Any], params: dict[str, Any],
                    results: Sequence[StageResult], ratios: dict[str, float], ok: bool) -> None:
    """One machine-readable line with every figure, last on stdout."""
    document = {
        "benchmark": benchmark, "ok": ok, "env": env, "params": params,
        "results": {r.stage: {**asdict(r), "lost": r.lost, "ok": r.ok} for r in results},
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
    }
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def conclude(benchmark: str, out: Console, status: Console, env: dict[str, Any], params: dict[str, Any],
             results: Sequence[StageResult], ratios: dict[str, float], *, failure: str,
             profiler: cProfile.Profile | None = None, profile: Path | None = None, profiled: str = "",
             json_only: bool = False, top: int = 20) -> None:
    """End a run: write and print the profile (if one was taken), the JSON line, and exit 1 naming
    the stages that failed their checks (``failure`` says what failed, e.g. "lost messages")."""
    if profiler is not None and profile is not None:
        profiler.dump_stats(profile)
        out.print(f"  profile of {profiled} written to {profile} (their figures are slowed by it)")
        if not json_only:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
    failed = [r for r in results if not r.ok]
    ok = bool(results) and not failed
    print_json_line(benchmark, env, params, results, ratios, ok=ok)
    if not ok:
        status.log(f"[red]{failure} in: {', '.join(r.stage for r in failed) or 'setup'}[/red]")
        raise SystemExit(1)


def status_console(quiet: bool) -> Console:
    """Progress goes to stderr, and nowhere with ``--json-only``."""
    return Console(stderr=True, quiet=quiet)
