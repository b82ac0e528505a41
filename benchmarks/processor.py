"""Governed processing: the command processor with tenant policies in force, exactly-once on.

Stages, in one run, on throwaway topics and groups (deleted at the end):

1. ``produce`` and ``passthrough-eos`` (from ``kafka_baseline``): the raw exactly-once
   consume → produce copy, the reference every processor figure is a ratio of.
2. ``processor``: one ``CommandProcessor`` deciding pre-loaded reference commands while
   every tenant has a published policy (roles, grants, rules, rate limits too high to
   trigger), so RBAC, the rules and the limiter run for every command.
3. ``processor-N-workers``, one per count of ``--workers`` (default 2; ``1,2,3`` runs three):
   the same in N worker processes of one group. ``processor-1-workers`` is one worker
   started like the others, so the counts compare with each other; each is printed beside
   ``passthrough-eos``, with the workers', the brokers' and the whole machine's CPU per
   command and the load average when it ended.
4. ``latency``: commands sent at a fixed rate (default 1,000/s, 10 every 10 ms) while one
   worker runs; per command, the time from its send to its first event being visible to a
   ``read_committed`` consumer (matched by the event's ``causation_id``).

By default the run uses the broker the settings name (``keel up``). ``--cluster 3`` starts a
private KRaft cluster of 3 nodes on free ports under a temporary data dir (every topic at
replication factor 3, ``min.insync.replicas`` 2, as ``keel up --brokers 3`` makes them) and
stops it at the end whatever happened, so the run never touches anyone's data.

Figures are printed, never judged; the exit status is non-zero only when commands were
lost, a cross-check failed or a topic did not get the replication asked for. Run with
``.venv/bin/python benchmarks/processor.py``.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any, NamedTuple, cast

import typer
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from _common import (
    private_keys,
    STORY_LENGTH,
    TENANTS,
    Mark,
    StageResult,
    committed_total,
    create_topics,
    environment,
    environment_table,
    machine_busy_seconds,
    mismatches,
    process_tree_cpu,
    reference_commands,
    results_table,
    status_console,
    unique_prefix,
    window_result,
)
from kafka_baseline import (
    MESSAGE_BYTES,
    Cleanup,
    passthrough,
    preload,
    produce_raw,
    ratios,
    run_processor,
)
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope, new_command
from keel.domain.governance.pipeline import CONTROLS_AGGREGATE
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.domain.messages import SetPolicy
from keel.kafka.broker import paths_for, pid_alive, read_pid
from keel.kafka.clients import admin_config, consumer_config, producer_config
from keel.kafka.cluster import node_paths, plan_cluster, recorded_cluster, start_cluster, stop_cluster
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.processor.worker import CommandProcessor, ProcessorStats
from keel.sdk.producer import PRINCIPAL_TENANT_HEADER

STALL_S = 30.0
LATENCY_BURST = 10  # commands per tick of the paced producer
LATENCY_DRAIN_S = 10.0  # after the last send, how long to wait for the last events

# A realistic tenant policy: least-privilege roles, per-actor grants, rules of every kind
# that the reference workload passes (the story's agent is sure of its refunds, and they
# are small), and rate limits far above the run's rate, so every check runs and none refuses.
POLICY: dict[str, Any] = {
    "version": "bench-1",
    "roles": {
        "billing-service": ["StartSubscription", "CancelSubscription", "ReactivateSubscription"],
        "support-agent": ["CancelSubscription", "IssueRefund", "ReverseRefund", "SendEmail"],
        "admin": ["*"],
    },
    "grants": {"service:billing": ["billing-service"], "agent:support-bot": ["support-agent"],
               "human:jane.lead": ["admin"]},
    "approver_roles": ["admin"],
    "rules": [
        {"name": "big-refunds-need-admin",
         "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100_000}}},
         "decision": "approve"},
        {"name": "unsure-agents-ask-the-customer",
         "match": {"command_types": ["IssueRefund"], "actor_kinds": ["agent"], "confidence_below": 0.5},
         "decision": "confirm"},
        {"name": "no-reactivation-by-agents",
         "match": {"command_types": ["ReactivateSubscription"], "actor_kinds": ["agent"]}, "decision": "deny"},
        {"name": "no-emails-from-unknown-templates",
         "match": {"command_types": ["SendEmail"], "payload": {"template": {"in": ["spam", "phishing"]}}},
         "decision": "deny"},
    ],
    "rate_limits": {"tenant_per_minute": 100_000_000, "actor_per_minute": 100_000_000},
}


# -- setting a prefix up ----------------------------------------------------------------


def policy_commands() -> list[Envelope]:
    """One ``SetPolicy`` per tenant of the reference workload, from the system actor."""
    document = json.dumps(POLICY)
    return [new_command(SetPolicy(document=document), tenant_id=tenant, aggregate_id=CONTROLS_AGGREGATE,
                        actor=SYSTEM_ACTOR) for tenant in TENANTS]


def fresh_prefix(base: Settings, partitions: int, batch_size: int, cleanup: Cleanup, admin: AdminClient) -> Settings:
    """``base`` (the run's broker or cluster) under a new prefix whose topics exist and are registered for cleanup."""
    settings = base.model_copy(update={"topic_prefix": unique_prefix("proc"), "topic_partitions": partitions,
                                       "processor_batch_size": batch_size})
    specs = declared_topics(settings)
    cleanup.topics += [s.name for s in specs]
    cleanup.groups += [f"{settings.topic_prefix}.{g}" for g in ("processor", "processor.loader",
                                                                  "controls-follower", "latency")]
    apply_topics(admin, specs)
    return settings


def publish_policies(settings: Settings) -> int:
    """Put the policy in force for every tenant through the governed path; returns the commands."""
    commands = policy_commands()
    preload(settings, commands)
    publisher = CommandProcessor(settings, instance_id=unique_prefix("policy"))
    try:
        stats = publisher.run_until_caught_up()
    finally:
        publisher.close()
    if stats.events != len(commands) or stats.rejected:
        raise RuntimeError(f"publishing the policies went wrong: {stats}")
    return len(commands)


def with_policies(result: StageResult, admin: AdminClient, group: str, count: int, published: int,
                  events: int) -> StageResult:
    """``result`` with the checks that the topics' totals meet counting the policy commands decided before.

    ``run_processor`` expects the group's committed offsets and the events topic to hold only
    the timed worker's commands and events; the publisher decided ``published`` more.
    """
    before = mismatches(("committed offsets", count + published, count),
                        ("events on the topic", events + published, events))
    committed = committed_total(admin, group)
    kept = tuple(a for a in result.anomalies if a not in before)
    return replace(result, anomalies=kept + mismatches(("committed offsets (with policies)", committed,
                                                        count + published)))


# -- 2. one worker ----------------------------------------------------------------------


def one_worker(base: Settings, admin: AdminClient, cleanup: Cleanup, commands: int, partitions: int,
               batch_size: int, status: Console) -> StageResult:
    """Pre-load the reference workload under a policy; time one worker deciding it."""
    settings = fresh_prefix(base, partitions, batch_size, cleanup, admin)
    published = publish_policies(settings)
    reference = reference_commands(commands // STORY_LENGTH)
    sent_s = preload(settings, reference)
    status.log(f"2/4 pre-loaded {len(reference):,} commands in {sent_s:.1f}s; deciding (1 worker)")
    result = run_processor(settings, admin, len(reference), len(reference) // STORY_LENGTH, None)
    events = int(result.detail.split(" events", 1)[0].replace(",", ""))  # run_processor counted them
    result = with_policies(result, admin, f"{settings.topic_prefix}.processor", len(reference), published, events)
    return replace(result, label="CommandProcessor, policies on, 1 worker")


# -- 3. N worker processes --------------------------------------------------------------


class Sample(NamedTuple):
    """CPU seconds outside the workers when a batch mark arrived: the brokers' and the whole machine's."""

    brokers: float
    machine: float


@dataclass(frozen=True)
class Scaling:
    """What a multi-worker stage adds to its ``StageResult``: where the rest of the CPU went, and the load."""

    workers: int
    broker_cpu_us_per_command: float | None
    """Over the same window as the workers' CPU; ``None`` when no broker process of this machine is known."""
    machine_cpu_us_per_command: float
    """Every busy core of the machine (other people's work included) over the window, per command."""
    aborted_batches: int
    load_avg_1m: float


def broker_pids(settings: Settings) -> dict[str, int]:
    """The live broker processes ``keel`` runs from the settings' data dir (one per node of a cluster), by name.

    Empty for a broker elsewhere: its CPU is then not counted.
    """
    layout = recorded_cluster(settings)
    files = ([node_paths(settings, node.node_id).pid_file for node in layout.nodes] if layout is not None
             else [paths_for(settings).pid_file])
    pids = {f"broker-{i}": read_pid(f) for i, f in enumerate(files, 1)}
    return {name: pid for name, pid in pids.items() if pid is not None and pid_alive(pid)}


def _worker_process(settings: Settings, ready: Any, start: ProcessEvent, stop: ProcessEvent,
                    marks: Any) -> None:
    """A worker process: build, wait for the others, decide until stopped; report each batch."""
    processor = CommandProcessor(settings, instance_id=unique_prefix("worker"))
    ready.wait()
    start.wait()
    try:
        def on_batch(stats: ProcessorStats) -> None:
            marks.put(("mark", os.getpid(), time.perf_counter(), time.process_time(),
                       stats.commands + stats.dead_lettered))

        processor.run(cast(threading.Event, stop), on_batch)  # run only asks is_set()
    finally:
        processor.close()
        marks.put(("done", os.getpid(), asdict(processor.stats)))


def many_workers(base: Settings, admin: AdminClient, cleanup: Cleanup, workers: int, commands: int,
                 partitions: int, batch_size: int, status: Console) -> tuple[StageResult, Scaling]:
    """The one-worker stage with ``workers`` processes in one group; timed once all have decided a batch."""
    settings = fresh_prefix(base, partitions, batch_size, cleanup, admin)
    published = publish_policies(settings)
    reference = reference_commands(commands // STORY_LENGTH)
    count = len(reference)
    sent_s = preload(settings, reference)
    status.log(f"3/4 pre-loaded {count:,} commands in {sent_s:.1f}s; deciding ({workers} worker processes)")
    brokers = broker_pids(settings)

    def sample() -> Sample:
        return Sample(sum(process_tree_cpu(brokers).values()), machine_busy_seconds())

    spawn = multiprocessing.get_context("spawn")  # no fork of a process with live librdkafka threads
    ready, start, stop, marks = spawn.Barrier(workers + 1), spawn.Event(), spawn.Event(), spawn.Queue()
    processes = [spawn.Process(target=_worker_process, args=(settings, ready, start, stop, marks))
                 for _ in range(workers)]
    for p in processes:
        p.start()
    ready.wait(timeout=120)
    began = time.perf_counter()
    start.set()
    latest: dict[int, Mark] = {}
    timeline: list[tuple[int, Mark, Sample]] = []
    finals: dict[int, dict[str, int]] = {}
    last_progress = time.monotonic()
    while len(finals) < workers:
        try:
            item = marks.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty: check for a stall
            if time.monotonic() - last_progress > STALL_S:
                stop.set()
            continue
        if item[0] == "mark":
            _, pid, wall, cpu, done = item
            latest[pid] = Mark(wall, cpu, done)
            timeline.append((pid, latest[pid], sample()))
            last_progress = time.monotonic()
            if sum(m.total for m in latest.values()) >= count:
                stop.set()
        else:
            finals[item[1]] = item[2]
    for p in processes:
        p.join(timeout=30)
    (first, first_sample), (last, last_sample) = _window(timeline, workers)
    total = {k: sum(f[k] for f in finals.values())
             for k in ("commands", "dead_lettered", "duplicates", "events", "aborted_batches")}
    committed = committed_total(admin, f"{settings.topic_prefix}.processor")
    start_mark = Mark(began, first.cpu, 0)
    result = window_result(
        f"processor-{workers}-workers", f"CommandProcessor, policies on, {workers} worker processes", count,
        total["commands"] + total["dead_lettered"], first, last, start=start_mark, message_bytes=None,
        batches=len(timeline), timed=f"all {workers} decided a batch",
        detail=(f"{total['events']:,} events; {total['aborted_batches']} aborted batches; "
                f"committed offsets: {committed:,} (incl. {published} policies)"),
        anomalies=mismatches(("dead-lettered", total["dead_lettered"], 0), ("duplicates", total["duplicates"], 0),
                             ("committed offsets (with policies)", committed, count + published),
                             ("decided", total["commands"], count)))
    timed = last.total - first.total
    per_command = 1e6 / timed if timed else 0.0
    return result, Scaling(
        workers=workers,
        broker_cpu_us_per_command=(last_sample.brokers - first_sample.brokers) * per_command if brokers else None,
        machine_cpu_us_per_command=(last_sample.machine - first_sample.machine) * per_command,
        aborted_batches=total["aborted_batches"], load_avg_1m=os.getloadavg()[0])


def _window(timeline: list[tuple[int, Mark, Sample]], workers: int) -> tuple[tuple[Mark, Sample], tuple[Mark, Sample]]:
    """Sums over the workers, with the samples taken then: from when every worker has decided a batch to the last.

    Walls and totals add up across processes; CPU is the sum of each worker's CPU time.
    """
    latest: dict[int, Mark] = {}
    first: tuple[Mark, Sample] | None = None
    for pid, mark, sample in timeline:
        latest[pid] = mark
        summed = Mark(mark.wall, sum(m.cpu for m in latest.values()), sum(m.total for m in latest.values()))
        if first is None and len(latest) == workers:
            first = summed, sample
    last = (Mark(timeline[-1][1].wall, sum(m.cpu for m in latest.values()), sum(m.total for m in latest.values())),
            timeline[-1][2]) if timeline else (Mark(0.0, 0.0, 0), Sample(0.0, 0.0))
    return first or last, last


# -- 4. latency -------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Send → visible (read_committed) latency of paced commands."""

    rate: int
    sent: int
    seen: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    send_lag_max_ms: float
    worker_cpu_us_per_command: float

    @property
    def lost(self) -> int:
        return self.sent - self.seen


def _latency_worker(settings: Settings, ready: ProcessEvent, stop: ProcessEvent, cpu: Any) -> None:
    """One worker: decide the policies, say it is ready, decide until stopped."""
    processor = CommandProcessor(settings, instance_id=unique_prefix("worker"))
    try:
        processor.run_until_caught_up()  # the policies; they hold from the next batch on
        ready.set()
        started = time.process_time()
        processor.run(cast(threading.Event, stop))  # run only asks is_set()
        cpu.value = time.process_time() - started
    finally:
        processor.close()


def paced_latency(base: Settings, admin: AdminClient, cleanup: Cleanup, rate: int, seconds: float,
                  partitions: int, batch_size: int, status: Console) -> Latency:
    """Send ``rate`` commands/s for ``seconds`` to one running worker; time each to its first event."""
    # The throughput stages leave megabytes of dirty pages: written back now, not during the stage.
    os.sync()
    settings = fresh_prefix(base, partitions, batch_size, cleanup, admin)
    preload(settings, policy_commands())
    spawn = multiprocessing.get_context("spawn")
    ready, stop, cpu = spawn.Event(), spawn.Event(), spawn.Value("d", 0.0)
    worker = spawn.Process(target=_latency_worker, args=(settings, ready, stop, cpu))
    worker.start()
    codec = EnvelopeCodec()
    ticks = int(seconds * rate / LATENCY_BURST)
    commands = reference_commands(ticks * LATENCY_BURST // STORY_LENGTH)
    # Encoded before the clock starts: the sender must keep its pace on a busy machine.
    records: list[tuple[uuid.UUID, bytes, bytes, list[tuple[str, str | bytes | None]]]] = [
        (c.id, codec.encode(c), c.key.encode(), [(PRINCIPAL_TENANT_HEADER, c.tenant_id.encode())]) for c in commands]
    events_topic = topic_name(settings, Topic.EVENTS)
    # A fetch returns as soon as committed data arrives, so its wait adds no latency; 100 ms,
    # not 5: the instrument's 200 empty fetches a second loaded the broker it measures
    # (p50 36-43 -> 32 ms, p99 85-91 -> 73-80 ms in alternating runs).
    consumer = Consumer(consumer_config(settings, f"{settings.topic_prefix}.latency", **{"fetch.wait.max.ms": 100}))
    consumer.assign([TopicPartition(events_topic, p, OFFSET_BEGINNING) for p in range(partitions)])  # no join
    # Started (connection, metadata, idempotent producer id) while the worker starts: else
    # the first half second of commands waits in the sender and the tail measures its start-up.
    commands_topic = topic_name(settings, Topic.COMMANDS)
    # No linger: the relay it stands for waits for each batch's delivery reports, which
    # sends at once, so a command it publishes never sits out the producer's 5 ms linger.
    producer = Producer(producer_config(settings, **{"linger.ms": 0}))
    producer.list_topics(commands_topic, timeout=30)
    if not ready.wait(timeout=120):
        stop.set()
        raise RuntimeError("the latency worker did not start")
    sent_at: dict[uuid.UUID, float] = {}
    seen_at: dict[uuid.UUID, float] = {}
    sender_done = threading.Event()
    lag = [0.0]

    def send() -> None:
        interval = LATENCY_BURST / rate
        begin = time.perf_counter()
        for tick in range(0, len(records), LATENCY_BURST):
            due = begin + tick // LATENCY_BURST * interval
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            lag[0] = max(lag[0], -pause)
            for command_id, value, key, headers in records[tick:tick + LATENCY_BURST]:
                sent_at[command_id] = time.perf_counter()
                producer.produce(commands_topic, value, key, headers=headers)
            producer.poll(0)
        producer.flush(30)
        sender_done.set()

    status.log(f"4/4 latency: {rate:,} commands/s for {seconds:.0f}s ({len(records):,} commands), one worker")
    sender = threading.Thread(target=send, daemon=True)
    # The instrument's own pauses are not the processor's latency: no garbage collection
    # in this process (tens of thousands of timestamps and records) while it measures.
    gc.collect()
    gc.disable()
    sender.start()
    drain_until = None
    try:
        while len(seen_at) < len(records):
            if sender_done.is_set() and drain_until is None:
                drain_until = time.perf_counter() + LATENCY_DRAIN_S
            if drain_until is not None and time.perf_counter() > drain_until:
                break
            for message in consumer.consume(1000, 0.005):
                if message.error() is None:
                    now = time.perf_counter()
                    causation = codec.read(message.value() or b"")["causation_id"]  # no validation
                    if causation is not None:
                        seen_at.setdefault(causation, now)
    finally:
        gc.enable()
        stop.set()
        consumer.close()
        worker.join(timeout=30)
    latencies = sorted((seen_at[i] - sent_at[i]) * 1000 for i in sent_at if i in seen_at)
    cut = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Latency(rate=rate, sent=len(sent_at), seen=len(latencies), p50_ms=cut[49], p95_ms=cut[94],
                   p99_ms=cut[98], max_ms=latencies[-1] if latencies else 0.0, send_lag_max_ms=lag[0] * 1000,
                   worker_cpu_us_per_command=cpu.value / len(records) * 1e6 if records else 0.0)


# -- the run ----------------------------------------------------------------------------


def latency_table(latency: Latency) -> Table:
    """The latency figures as a rich table."""
    table = Table(title=f"command → event visible (read_committed), {latency.rate:,} commands/s paced")
    for column in ("sent", "seen", "p50 ms", "p95 ms", "p99 ms", "max ms", "send lag max ms", "worker CPU µs/cmd"):
        table.add_column(column, justify="right")
    seen = f"{latency.seen:,}" if not latency.lost else f"[red]{latency.seen:,}[/red]"
    table.add_row(f"{latency.sent:,}", seen, f"{latency.p50_ms:.1f}", f"{latency.p95_ms:.1f}",
                  f"{latency.p99_ms:.1f}", f"{latency.max_ms:.1f}", f"{latency.send_lag_max_ms:.1f}",
                  f"{latency.worker_cpu_us_per_command:.0f}")
    return table


def scaling_table(results: dict[str, StageResult], scaled: list[Scaling], loads: dict[str, float]) -> Table:
    """Each worker count beside the same run's exactly-once passthrough and one worker (the 1-worker stage, else
    the in-process ``processor``), with the load."""
    eos = results.get("passthrough-eos")
    one = results.get("processor-1-workers") or results.get("processor")
    baseline = f"passthrough-eos {eos.rate:,.0f} msgs/s (load {loads[eos.stage]:.2f})" if eos else "no passthrough"
    table = Table(title=f"Workers in one group, commands/s and CPU per command; {baseline}")
    for column in ("workers", "commands/s", "incl. start", "× 1 worker", "/ passthrough-eos",
                   "worker CPU µs/cmd", "cmds/s per worker core", "broker CPU µs/cmd", "machine CPU µs/cmd",
                   "aborted", "load 1m"):
        table.add_column(column, justify="right")
    for s in scaled:
        r = results[f"processor-{s.workers}-workers"]
        table.add_row(
            str(s.workers), f"{r.rate:,.0f}", f"{r.rate_incl_start:,.0f}",
            f"{r.rate / one.rate:.2f}" if one and one.rate else "-",
            f"{r.rate / eos.rate:.3f}" if eos and eos.rate else "-", f"{r.cpu_us_per_message:.1f}",
            f"{1e6 / r.cpu_us_per_message:,.0f}" if r.cpu_us_per_message else "-",
            f"{s.broker_cpu_us_per_command:.1f}" if s.broker_cpu_us_per_command is not None else "-",
            f"{s.machine_cpu_us_per_command:.1f}", str(s.aborted_batches), f"{s.load_avg_1m:.2f}")
    return table


def worker_counts(value: str) -> list[int]:
    """``--workers``: a comma list of worker counts, each run as a stage of its own; ``0`` runs none."""
    try:
        counts = [int(part) for part in value.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma list of worker counts, e.g. 1,2,3",
                                 param_hint="--workers") from None
    if any(n < 0 for n in counts):
        raise typer.BadParameter("worker counts are 0 or more", param_hint="--workers")
    return list(dict.fromkeys(n for n in counts if n))


def free_port() -> int:
    """A port nothing listens on now (the cluster's nodes bind them a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def private_cluster(brokers: int, status: Console) -> Iterator[Settings]:
    """Settings of a KRaft cluster of ``brokers`` nodes started for this run alone, stopped whatever happens.

    Free ports and a temporary data dir: the run never meets the developer's broker or data.
    """
    with tempfile.TemporaryDirectory(prefix="keel-bench-cluster-") as folder:
        base = Settings(data_dir=Path(folder), kafka_start_timeout_s=120.0)
        layout = plan_cluster(base, brokers, [(free_port(), free_port()) for _ in range(brokers)])
        settings = base.model_copy(update={"kafka_bootstrap": layout.bootstrap,
                                           "replication_factor": layout.replication_factor,
                                           "min_insync_replicas": layout.min_insync_replicas})
        status.log(f"starting a private {brokers}-broker cluster at {layout.bootstrap} under {folder}")
        try:
            start_cluster(settings, layout)
            yield settings
        finally:
            stopped = stop_cluster(settings, layout)
            status.log(f"stopped the private cluster (pids {', '.join(map(str, stopped))})")


def replicas_per_partition(admin: AdminClient, topics: list[str]) -> Counter[int]:
    """How many partitions of ``topics`` have each replica count: the check that a cluster run replicated."""
    metadata = admin.list_topics(timeout=30).topics
    return Counter(len(p.replicas) for name in topics if name in metadata
                   for p in metadata[name].partitions.values())


@contextmanager
def broker(cluster: int, status: Console) -> Iterator[Settings]:
    """The run's broker: a private cluster of ``cluster`` nodes, or (0) the one the settings name."""
    if cluster:
        with private_cluster(cluster, status) as settings:
            yield settings
    else:
        yield Settings()


def run(settings: Settings, messages: int, commands: int, workers: list[int], rate: int, seconds: float,
        partitions: int, batch_size: int, status: Console, out: Console) -> tuple[bool, dict[str, Any]]:
    """Every stage on ``settings``' broker, then the report; whether it held, and the JSON document."""
    admin = AdminClient(admin_config(settings))
    env = environment(settings, admin)
    params = {"messages": messages, "commands": commands - commands % STORY_LENGTH,
              "workers": ",".join(map(str, workers)) or "0", "latency_rate": rate, "latency_seconds": seconds,
              "partitions": partitions, "batch_size": batch_size, "replication_factor": settings.replication_factor,
              "min_insync_replicas": settings.min_insync_replicas, "policy": POLICY["version"]}
    cleanup = Cleanup()
    results: list[StageResult] = []
    scaled: list[Scaling] = []
    loads: dict[str, float] = {}
    latency: Latency | None = None
    replicas: Counter[int] = Counter()
    try:
        prefix = unique_prefix("raw")
        raw, eos_out = f"{prefix}.source", f"{prefix}.eos-out"
        cleanup.topics += [raw, eos_out]
        cleanup.groups += [f"{raw}.probe", f"{prefix}.eos"]
        create_topics(admin, [raw, eos_out], partitions, settings.replication_factor)
        status.log(f"1/4 producing {messages:,} × {MESSAGE_BYTES} B; exactly-once passthrough")
        results.append(produce_raw(settings, raw, messages))
        results.append(passthrough(settings, admin, raw, eos_out, f"{prefix}.eos", messages, batch_size,
                                   exactly_once=True))
        loads["passthrough-eos"] = os.getloadavg()[0]
        results.append(one_worker(settings, admin, cleanup, commands, partitions, batch_size, status))
        loads["processor"] = os.getloadavg()[0]
        for count in workers:
            result, scaling = many_workers(settings, admin, cleanup, count, commands, partitions, batch_size, status)
            results.append(result)
            scaled.append(scaling)
            loads[result.stage] = scaling.load_avg_1m
        latency = paced_latency(settings, admin, cleanup, rate, seconds, partitions, batch_size, status)
        replicas = replicas_per_partition(admin, cleanup.topics)
    finally:
        for problem in cleanup.run(admin):
            status.log(f"[yellow]cleanup: {problem}[/yellow]")
    env["load_avg_1m_end"] = os.getloadavg()[0]
    env["replicas_per_partition"] = ", ".join(f"{n} ({k:,} partitions)" for n, k in sorted(replicas.items()))
    by_stage = {r.stage: r for r in results}
    figures = {k: v for k, v in ratios(by_stage).items() if k.startswith("processor")}
    eos = by_stage.get("passthrough-eos")
    for r in results:
        if r.stage.startswith("processor-") and eos is not None and eos.rate:
            figures[f"{r.stage}/passthrough-eos"] = r.rate / eos.rate
    out.print(environment_table(env, params))
    out.print(results_table("Governed processing (msgs or commands/s over the timed window)", results))
    for r in results:
        out.print(f"  {r.stage}: {r.label}; {r.detail}" + "".join(f"\n    [red]{a}[/red]" for a in r.anomalies))
    for name, value in figures.items():
        out.print(f"  ratio {name}: [bold]{value:.3f}[/bold]")
    if scaled:
        out.print(scaling_table(by_stage, scaled, loads))
    if latency is not None:
        out.print(latency_table(latency))
    replicated = set(replicas) == {settings.replication_factor}
    if not replicated:
        out.print(f"  [red]replicas per partition: {env['replicas_per_partition'] or 'none seen'}; "
                  f"expected {settings.replication_factor}[/red]")
    ok = (bool(results) and all(r.ok for r in results) and latency is not None and not latency.lost
          and replicated)
    document = {
        "benchmark": "processor", "ok": ok, "env": env, "params": params,
        "results": {r.stage: {**asdict(r), "lost": r.lost, "ok": r.ok, "load_avg_1m": loads.get(r.stage)}
                    for r in results},
        "scaling": [asdict(s) for s in scaled],
        "ratios": {k: round(v, 4) for k, v in figures.items()},
        "latency": {**asdict(latency), "lost": latency.lost} if latency is not None else None,
    }
    return ok, document


app = typer.Typer(add_completion=False)


@app.command()
def main(
    messages: int = typer.Option(500_000, min=10_000, help="Raw messages for the exactly-once passthrough."),
    commands: int = typer.Option(80_000, min=1_000, help="Commands per throughput stage (5 per aggregate)."),
    workers: str = typer.Option("2", help="Worker counts, comma-separated (1,2,3): one multi-process stage "
                                "each, at most one worker per partition; 0 runs none."),
    cluster: int = typer.Option(0, min=0, help="Start a private KRaft cluster of this many brokers (at least "
                                "2) for the run and stop it after; 0: the broker the settings name."),
    rate: int = typer.Option(1_000, min=10, help="Commands/s of the latency stage."),
    seconds: float = typer.Option(15.0, min=1.0, help="Length of the latency stage."),
    partitions: int = typer.Option(6, min=1, help="Partitions of every topic the run creates."),
    batch_size: int = typer.Option(5_000, min=1, help="Records per batch / transaction."),
    json_only: bool = typer.Option(False, "--json-only", help="Print only the final JSON line."),
) -> None:
    """Measure governed, exactly-once processing against the raw exactly-once passthrough; print it."""
    private_keys()
    counts = worker_counts(workers)
    if any(n > partitions for n in counts):
        # A worker beyond the partition count gets no partition and never decides a batch.
        raise typer.BadParameter(f"at most one worker per partition ({partitions})", param_hint="--workers")
    if cluster == 1:
        raise typer.BadParameter("a cluster has at least 2 brokers; 0 runs on the settings' broker",
                                 param_hint="--cluster")
    status = status_console(json_only)
    out = Console(quiet=json_only, width=None if sys.stdout.isatty() else 160)
    with broker(cluster, status) as settings:
        ok, document = run(settings, messages, commands, counts, rate, seconds, partitions, batch_size, status, out)
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    if not ok:
        status.log("[red]lost commands, a failed cross-check or topics not replicated as asked[/red]")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
