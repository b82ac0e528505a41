"""Processor start-up: loading a partition from its snapshot against folding it whole, and the memory.

Stages, in one run, on one-partition throwaway topics (``bench-startup-…``, deleted at the end):

1. ``produce``: ``--events`` pre-encoded events of ``--aggregates`` subscriptions, raw into
   the events partition. Each subscription's history is real envelopes of the reference
   domain, encoded once with ``EnvelopeCodec().encode`` and re-stamped per subscription (its
   id and every command and event id, so every event names a distinct decided command):
   started, then e-mails queued, their effects completed (``EffectSucceeded``) and
   oversized refunds rejected, in turn.
2. ``raw-read``: the partition read back without decoding (``read_committed``): the floor of
   any load.
3. ``full-fold``: a worker, in a process of its own, with no snapshot: it decodes and folds
   every event. It then decides one command; that transaction writes the partition's
   first checkpoint (every aggregate and id), timed as ``first-checkpoint``.
4. ``snapshot``: a fresh worker process loads that checkpoint and the events after it.

Each worker reports its load's wall and CPU time, its resident memory (RSS) once loaded
and its peak. Figures are printed, never judged; the exit status is non-zero only when the
two loads disagree (aggregates, ids) or the infrastructure failed.

Run with ``.venv/bin/python benchmarks/startup.py`` against a broker from ``keel up``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import typer
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.table import Table

from _common import (
    private_keys,
    TENANTS,
    delete_groups,
    delete_topics,
    environment,
    environment_table,
    now_mark,
    status_console,
    unique_prefix,
)
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.commands import CompleteEffect
from keel.domain.envelope import Actor, ActorKind, Envelope, new_command
from keel.domain.events import CommandRejected, EffectSucceeded
from keel.domain.outcomes import to_events
from keel.kafka.clients import admin_config, loader_config, producer_config
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.processor.state import PartitionState
from keel.processor.worker import CommandProcessor
from keel.sdk.producer import CommandProducer
from support_desk.messages import EmailQueued, IssueRefund, SendEmail, StartSubscription, SubscriptionStarted

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
EFFECTS = Actor(kind=ActorKind.SERVICE, id="effects")
TEMPLATE_ID = "sub-00000000"  # fixed width: a re-stamped id keeps the Avro string's length
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CYCLE = 3  # e-mail queued, its effect completed, a refund rejected


# -- 1. the events ----------------------------------------------------------------------


def history(tenant: str, length: int, now: datetime) -> list[Envelope]:
    """``length`` events of one subscription, as the processor would have written them."""
    def by_agent(payload: Any) -> Envelope:
        return new_command(payload, tenant_id=tenant, aggregate_id=TEMPLATE_ID, actor=AGENT, on_behalf_of="cust-1")

    started = by_agent(StartSubscription(customer_id="cust-1", plan="pro", monthly_price_cents=5000, currency="EUR"))
    events = to_events(started, [SubscriptionStarted(customer_id="cust-1", plan="pro", monthly_price_cents=5000,
                                                     currency="EUR")], version=0, now=now)
    version, email, emailed_by = 1, events[0], started.id
    while len(events) < length:
        step = (len(events) - 1) % _CYCLE
        if step == 0:
            sent = by_agent(SendEmail(to_address="cust-1@example.com", template="refund-issued"))
            emailed_by = sent.id
            [email] = to_events(sent, [EmailQueued(to_address="cust-1@example.com", template="refund-issued")],
                                version=version, now=now)
            events.append(email)
        elif step == 1:
            done = new_command(CompleteEffect(effect_id=email.id, generation=0, provider="email", attempts=1,
                                              result="{}"), tenant_id=tenant, aggregate_id=TEMPLATE_ID,
                               actor=EFFECTS)
            events += to_events(done, [EffectSucceeded(effect_id=email.id, origin_command_id=emailed_by,
                                                       generation=0, provider="email", attempts=1, result="{}")],
                                version=version, now=now)
        else:
            rejected = by_agent(IssueRefund(amount_cents=10**6, currency="EUR", reason="goodwill", confidence=0.9))
            events += to_events(rejected, [CommandRejected(command_type="IssueRefund", code="refund_exceeds_paid",
                                                           reason="too much")], version=version, now=now)
        version = max(e.version or 0 for e in events)
    return events


@dataclass(frozen=True)
class Template:
    """One tenant's encoded history, cut where the aggregate id and the ids go."""

    pieces: list[list[bytes | int]]
    """Per event: literal bytes, and ints naming a slot (0: the aggregate id, n: the n-th id)."""
    ids: int


def template(tenant: str, length: int, now: datetime) -> Template:
    codec, slots = EnvelopeCodec(), {TEMPLATE_ID.encode(): 0}
    pieces: list[list[bytes | int]] = []
    for event in history(tenant, length, now):
        value, at = codec.encode(event), 0
        cut: list[bytes | int] = []
        for match in re.finditer(rb"sub-00000000|" + _UUID.pattern, value):
            cut += [value[at:match.start()], slots.setdefault(match.group(), len(slots))]
            at = match.end()
        pieces.append([*cut, value[at:]])
    return Template(pieces, len(slots) - 1)


def produce_events(settings: Settings, topic: str, events: int, aggregates: int) -> dict[str, Any]:
    """Produce ``events`` events of ``aggregates`` subscriptions, raw; returns the stage's figures."""
    length = max(3, events // aggregates)
    now = datetime.now(UTC)
    templates = [template(tenant, length, now) for tenant in TENANTS]
    producer = Producer(producer_config(settings, **{"linger.ms": 50, "batch.size": 1_000_000}))
    start, produced, run = now_mark(0), 0, uuid.uuid4().hex[:12]
    for number in range(aggregates):
        tenant = TENANTS[number % len(TENANTS)]
        chosen = templates[number % len(TENANTS)]
        slots = [f"sub-{number:08d}".encode()] + [
            f"{number:08x}-{slot:04x}-4000-8000-{run}".encode() for slot in range(1, chosen.ids + 1)]
        key = f"{tenant}/sub-{number:08d}".encode()
        for pieces in chosen.pieces[:min(length, events - produced)]:
            value = b"".join(piece if isinstance(piece, bytes) else slots[piece] for piece in pieces)
            while True:
                try:
                    producer.produce(topic, value, key, partition=0)
                    break
                except BufferError:
                    producer.poll(0.05)
            produced += 1
        producer.poll(0)
    remaining = producer.flush(120)
    end = now_mark(produced)
    return {"stage": "produce", "events": produced - remaining, "wall_s": end.wall - start.wall,
            "cpu_s": end.cpu - start.cpu, "events_per_aggregate": length}


# -- 2. the raw read --------------------------------------------------------------------


def raw_read(settings: Settings, topic: str, group: str) -> dict[str, Any]:
    """Read the partition to its end without decoding: what any load pays before folding."""
    consumer = Consumer(loader_config(settings, group))
    start, read, size = now_mark(0), 0, 0
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        while True:
            messages = consumer.consume(10_000, timeout=0.1)
            error = next((m.error() for m in messages if m.error() is not None), None)
            batch = [m for m in messages if m.error() is None]
            read += len(batch)
            size += sum(len(m.value() or b"") for m in batch)
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                break
    finally:
        consumer.close()
    end = now_mark(read)
    return {"stage": "raw-read", "events": read, "wall_s": end.wall - start.wall, "cpu_s": end.cpu - start.cpu,
            "mb": size / 1e6}


# -- 3, 4. the workers (each in a process of its own) -----------------------------------


class TimedProcessor(CommandProcessor):
    """A worker that times its partition load."""

    load: dict[str, float] = {}

    def _load_partitions(self, partitions: list[int]) -> dict[int, PartitionState]:
        start = now_mark(0)
        states = super()._load_partitions(partitions)
        end = now_mark(0)
        self.load = {"wall_s": end.wall - start.wall, "cpu_s": end.cpu - start.cpu}
        return states


def memory_kib() -> dict[str, int]:
    """This process's resident memory now and at its peak, KiB."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "peak_rss_kib": int(fields["VmHWM"].split()[0])}


def run_worker(settings: Settings, stage: str, checkpoint: bool) -> dict[str, Any]:
    """Start a worker, let it load partition 0; with ``checkpoint``, decide one command after."""
    worker = TimedProcessor(settings, instance_id=stage)
    try:
        deadline = time.monotonic() + 3600
        while not worker.partitions and time.monotonic() < deadline:
            worker.process_batch(0.2)
        [state] = worker.partitions.values()
        figures: dict[str, Any] = {"stage": stage, **worker.load, **memory_kib(),
                                   "aggregates": len(state.aggregates), "ids": len(state.decided)}
        if checkpoint:
            with CommandProducer(settings) as producer:
                producer.send(new_command(StartSubscription(customer_id="c", plan="pro", monthly_price_cents=1,
                                                            currency="EUR"),
                                          tenant_id="acme", aggregate_id="sub-new", actor=AGENT))
            start = now_mark(0)
            worker.run_until_caught_up(timeout_s=600)
            end = now_mark(0)
            figures["checkpoint"] = {"wall_s": end.wall - start.wall, "cpu_s": end.cpu - start.cpu}
        return figures
    finally:
        worker.close()


def worker_process(settings: Settings, stage: str, checkpoint: bool) -> dict[str, Any]:
    """``run_worker`` in a child process: its memory is the worker's alone."""
    env = {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_TOPIC_PARTITIONS": "1",
           "KEEL_PROCESSOR_SNAPSHOT_EVENTS": str(settings.processor_snapshot_events)}
    args = [sys.executable, __file__, "--worker", stage] + (["--checkpoint"] if checkpoint else [])
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the {stage} worker failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the run ----------------------------------------------------------------------------


app = typer.Typer(add_completion=False)


@app.command()
def main(
    events: int = typer.Option(1_000_000, min=1_000, help="Events in the partition."),
    aggregates: int = typer.Option(10_000, min=1, help="Subscriptions the events belong to."),
    json_only: bool = typer.Option(False, "--json-only", help="Print only the final JSON line."),
    worker: str | None = typer.Option(None, hidden=True, help="Run this worker stage (in a child process)."),
    checkpoint: bool = typer.Option(False, hidden=True, help="The worker decides a command after its load."),
) -> None:
    """Load one events partition from a snapshot and by a full fold; print time and memory of each."""
    private_keys()
    if worker is not None:  # a child process: its figures as one JSON line
        sys.stdout.write(json.dumps(run_worker(Settings(), worker, checkpoint)) + "\n")
        return
    console = status_console(json_only)
    prefix = unique_prefix("startup")
    settings = Settings(topic_prefix=prefix, topic_partitions=1)
    admin = AdminClient(admin_config(settings))
    env = environment(settings, admin)
    params = {"events": events, "aggregates": aggregates, "partitions": 1,
              "snapshot_events": settings.processor_snapshot_events,
              "dedupe_window_s": settings.processor_dedupe_window_s}
    specs = declared_topics(settings)
    groups = [f"{prefix}.processor", f"{prefix}.processor.loader", f"{prefix}.raw"]
    results: list[dict[str, Any]] = []
    try:
        apply_topics(admin, specs)
        events_topic = topic_name(settings, Topic.EVENTS)
        console.print(f"producing {events:,} events of {aggregates:,} subscriptions…")
        results.append(produce_events(settings, events_topic, events, aggregates))
        console.print("reading them raw…")
        results.append(raw_read(settings, events_topic, f"{prefix}.raw"))
        console.print("loading by a full fold, then writing the first checkpoint…")
        results.append(worker_process(settings, "full-fold", checkpoint=True))
        console.print("loading from the snapshot…")
        results.append(worker_process(settings, "snapshot", checkpoint=False))
    finally:
        problems = delete_groups(admin, groups) + delete_topics(admin, [s.name for s in specs])
        for problem in problems:
            console.print(f"[yellow]cleanup: {problem}[/yellow]")
    env["load_avg_1m_end"] = os.getloadavg()[0]
    produced, full, snapshot = results[0], results[2], results[3]
    anomalies = [f"{what}: {got:,}, expected {want:,}" for what, got, want in (
        ("aggregates after the full fold", full["aggregates"], aggregates),
        ("ids after the full fold", full["ids"], produced["events"]),
        # the command decided after the full fold adds an aggregate and an id
        ("aggregates from the snapshot", snapshot["aggregates"], full["aggregates"] + 1),
        ("ids from the snapshot", snapshot["ids"], full["ids"] + 1)) if got != want]
    if not json_only:
        console.print(environment_table(env, params))
        console.print(figures_table(results))
        for anomaly in anomalies:
            console.print(f"[red]{anomaly}[/red]")
    sys.stdout.write(json.dumps({"benchmark": "startup", "ok": not anomalies, "env": env, "params": params,
                                 "results": results, "anomalies": anomalies}, separators=(",", ":")) + "\n")
    raise typer.Exit(1 if anomalies else 0)


def figures_table(results: list[dict[str, Any]]) -> Table:
    table = Table(title="start-up of one partition")
    for column in ("stage", "events", "wall s", "CPU s", "CPU µs/event", "RSS MiB", "peak RSS MiB"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    events = results[0]["events"]
    for r in results:
        mib = {k: f"{r[k] / 1024:,.0f}" if k in r else "-" for k in ("rss_kib", "peak_rss_kib")}
        table.add_row(r["stage"], f"{r.get('events', events):,}", f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                      f"{r['cpu_s'] / events * 1e6:.1f}", mib["rss_kib"], mib["peak_rss_kib"])
        if "checkpoint" in r:  # a batch of one command, whose transaction holds every aggregate and id
            table.add_row("first-checkpoint", "-", f"{r['checkpoint']['wall_s']:.2f}",
                          f"{r['checkpoint']['cpu_s']:.2f}", "-", "-", "-")
    return table


if __name__ == "__main__":
    app()
