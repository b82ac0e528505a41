"""Governed processing: the command processor with tenant policies in force, exactly-once on.

Stages, in one run, on throwaway topics and groups (deleted at the end):

1. ``produce`` and ``passthrough-eos`` (from ``kafka_baseline``): the raw exactly-once
   consume → produce copy, the reference every processor figure is a ratio of.
2. ``processor``: one ``CommandProcessor`` deciding pre-loaded reference commands while
   every tenant has a published policy (roles, grants, rules, rate limits too high to
   trigger), so RBAC, the rules and the limiter run for every command.
3. ``processor-2-workers`` (optional): the same in two worker processes of one group.
4. ``latency``: commands sent at a fixed rate (default 1,000/s, 10 every 10 ms) while one
   worker runs; per command, the time from its send to its first event being visible to a
   ``read_committed`` consumer (matched by the event's ``causation_id``).

Figures are printed, never judged; the exit status is non-zero only when commands were
lost or a cross-check failed. Run with ``.venv/bin/python benchmarks/processor.py``.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any, cast

import typer
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from _common import (
    STORY_LENGTH,
    TENANTS,
    Mark,
    StageResult,
    committed_total,
    create_topics,
    environment,
    environment_table,
    mismatches,
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
    processor_settings,
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
from keel.kafka.clients import admin_config, consumer_config, producer_config
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


def fresh_prefix(partitions: int, batch_size: int, cleanup: Cleanup, admin: AdminClient) -> Settings:
    """Settings under a new prefix whose topics exist and are registered for cleanup."""
    settings = processor_settings(partitions, batch_size)
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


def one_worker(admin: AdminClient, cleanup: Cleanup, commands: int, partitions: int, batch_size: int,
               status: Console) -> StageResult:
    """Pre-load the reference workload under a policy; time one worker deciding it."""
    settings = fresh_prefix(partitions, batch_size, cleanup, admin)
    published = publish_policies(settings)
    reference = reference_commands(commands // STORY_LENGTH)
    sent_s = preload(settings, reference)
    status.log(f"2/4 pre-loaded {len(reference):,} commands in {sent_s:.1f}s; deciding (1 worker)")
    result = run_processor(settings, admin, len(reference), len(reference) // STORY_LENGTH, None)
    events = int(result.detail.split(" events", 1)[0].replace(",", ""))  # run_processor counted them
    result = with_policies(result, admin, f"{settings.topic_prefix}.processor", len(reference), published, events)
    return replace(result, label="CommandProcessor, policies on, 1 worker")


# -- 3. N worker processes --------------------------------------------------------------


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


def many_workers(admin: AdminClient, cleanup: Cleanup, workers: int, commands: int, partitions: int,
                 batch_size: int, status: Console) -> StageResult:
    """The one-worker stage with ``workers`` processes in one group; timed once all have decided a batch."""
    settings = fresh_prefix(partitions, batch_size, cleanup, admin)
    published = publish_policies(settings)
    reference = reference_commands(commands // STORY_LENGTH)
    count = len(reference)
    sent_s = preload(settings, reference)
    status.log(f"3/4 pre-loaded {count:,} commands in {sent_s:.1f}s; deciding ({workers} worker processes)")
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
    timeline: list[tuple[int, Mark]] = []
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
            timeline.append((pid, latest[pid]))
            last_progress = time.monotonic()
            if sum(m.total for m in latest.values()) >= count:
                stop.set()
        else:
            finals[item[1]] = item[2]
    for p in processes:
        p.join(timeout=30)
    first, last = _window(timeline, workers)
    total = {k: sum(f[k] for f in finals.values()) for k in ("commands", "dead_lettered", "duplicates", "events")}
    committed = committed_total(admin, f"{settings.topic_prefix}.processor")
    start_mark = Mark(began, first.cpu, 0)
    return window_result(
        f"processor-{workers}-workers", f"CommandProcessor, policies on, {workers} worker processes", count,
        total["commands"] + total["dead_lettered"], first, last, start=start_mark, message_bytes=None,
        batches=len(timeline), timed=f"all {workers} decided a batch",
        detail=f"{total['events']:,} events; committed offsets: {committed:,} (incl. {published} policies)",
        anomalies=mismatches(("dead-lettered", total["dead_lettered"], 0), ("duplicates", total["duplicates"], 0),
                             ("committed offsets (with policies)", committed, count + published),
                             ("decided", total["commands"], count)))


def _window(timeline: list[tuple[int, Mark]], workers: int) -> tuple[Mark, Mark]:
    """Sums over the workers: from when every worker has decided a batch to the last batch.

    Walls and totals add up across processes; CPU is the sum of each worker's CPU time.
    """
    latest: dict[int, Mark] = {}
    first: Mark | None = None
    for pid, mark in timeline:
        latest[pid] = mark
        summed = Mark(mark.wall, sum(m.cpu for m in latest.values()), sum(m.total for m in latest.values()))
        if first is None and len(latest) == workers:
            first = summed
    last = Mark(timeline[-1][1].wall, sum(m.cpu for m in latest.values()), sum(m.total for m in latest.values())) \
        if timeline else Mark(0.0, 0.0, 0)
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


def paced_latency(admin: AdminClient, cleanup: Cleanup, rate: int, seconds: float, partitions: int,
                  batch_size: int, status: Console) -> Latency:
    """Send ``rate`` commands/s for ``seconds`` to one running worker; time each to its first event."""
    # The throughput stages leave megabytes of dirty pages: written back now, not during the stage.
    os.sync()
    settings = fresh_prefix(partitions, batch_size, cleanup, admin)
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


app = typer.Typer(add_completion=False)


@app.command()
def main(
    messages: int = typer.Option(500_000, min=10_000, help="Raw messages for the exactly-once passthrough."),
    commands: int = typer.Option(80_000, min=1_000, help="Commands per throughput stage (5 per aggregate)."),
    workers: int = typer.Option(2, min=0, help="Worker processes of the multi-worker stage (0 or 1: skip it)."),
    rate: int = typer.Option(1_000, min=10, help="Commands/s of the latency stage."),
    seconds: float = typer.Option(15.0, min=1.0, help="Length of the latency stage."),
    partitions: int = typer.Option(6, min=1, help="Partitions of every topic the run creates."),
    batch_size: int = typer.Option(5_000, min=1, help="Records per batch / transaction."),
    json_only: bool = typer.Option(False, "--json-only", help="Print only the final JSON line."),
) -> None:
    """Measure governed, exactly-once processing against the raw exactly-once passthrough; print it."""
    settings = Settings()
    admin = AdminClient(admin_config(settings))
    status = status_console(json_only)
    out = Console(quiet=json_only, width=None if sys.stdout.isatty() else 120)
    env = environment(settings, admin)
    params = {"messages": messages, "commands": commands - commands % STORY_LENGTH, "workers": workers,
              "latency_rate": rate, "latency_seconds": seconds, "partitions": partitions,
              "batch_size": batch_size, "policy": POLICY["version"]}
    cleanup = Cleanup()
    results: list[StageResult] = []
    latency: Latency | None = None
    try:
        prefix = unique_prefix("raw")
        raw, eos_out = f"{prefix}.source", f"{prefix}.eos-out"
        cleanup.topics += [raw, eos_out]
        cleanup.groups += [f"{raw}.probe", f"{prefix}.eos"]
        create_topics(admin, [raw, eos_out], partitions)
        status.log(f"1/4 producing {messages:,} × {MESSAGE_BYTES} B; exactly-once passthrough")
        results.append(produce_raw(settings, raw, messages))
        results.append(passthrough(settings, admin, raw, eos_out, f"{prefix}.eos", messages, batch_size,
                                   exactly_once=True))
        results.append(one_worker(admin, cleanup, commands, partitions, batch_size, status))
        if workers > 1:
            results.append(many_workers(admin, cleanup, workers, commands, partitions, batch_size, status))
        latency = paced_latency(admin, cleanup, rate, seconds, partitions, batch_size, status)
    finally:
        for problem in cleanup.run(admin):
            status.log(f"[yellow]cleanup: {problem}[/yellow]")
    env["load_avg_1m_end"] = os.getloadavg()[0]
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
    if latency is not None:
        out.print(latency_table(latency))
    ok = bool(results) and all(r.ok for r in results) and latency is not None and not latency.lost
    document = {
        "benchmark": "processor", "ok": ok, "env": env, "params": params,
        "results": {r.stage: {**asdict(r), "lost": r.lost, "ok": r.ok} for r in results},
        "ratios": {k: round(v, 4) for k, v in figures.items()},
        "latency": {**asdict(latency), "lost": latency.lost} if latency is not None else None,
    }
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    if not ok:
        status.log("[red]lost commands or a failed cross-check[/red]")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
