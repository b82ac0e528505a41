"""Kafka baseline: raw confluent-kafka rates on the local broker, and Keel's processor against them.

Stages, in one run, on throwaway topics and groups (deleted at the end):

1. ``produce``: raw idempotent ``acks=all`` produce of 300-byte messages.
2. ``passthrough-plain``: consume → produce → flush → commit offsets, per batch (at-least-once).
   ``passthrough-eos``: one Kafka transaction per batch: begin, produce, send offsets, commit.
3. ``processor``: ``CommandProcessor`` deciding pre-loaded reference-domain commands, as a
   ratio of ``passthrough-eos`` from the same run.

Consuming stages are timed from the end of their first batch to the end of their last, so
the group join, the processor's partition load and the first fetch are excluded; the rate
with them included is printed too. "CPU µs/msg" is this process's CPU time over the same
window (every thread, librdkafka's included) per message: other load on the machine
disturbs it less than wall-clock rates. Figures are printed, never judged; the exit status is
non-zero only when a stage lost messages or the infrastructure failed.

Run with ``.venv/bin/python benchmarks/kafka_baseline.py`` against a broker from ``keel up``.
"""

from __future__ import annotations

import cProfile
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import typer
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from rich.console import Console

from _common import (
    private_keys,
    STORY_LENGTH,
    TENANTS,
    BatchClock,
    StageResult,
    committed_total,
    create_topics,
    delete_groups,
    delete_topics,
    environment,
    environment_table,
    high_watermarks_total,
    mismatches,
    next_offsets,
    now_mark,
    conclude,
    record_types,
    reference_commands,
    results_table,
    stage_result,
    status_console,
    unique_prefix,
    window_result,
)
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.kafka.clients import admin_config, consumer_config, producer_config, transactional_producer_config
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.processor.worker import CommandProcessor, ProcessorStats
from keel.observability import tracing
from keel.sdk.producer import CommandProducer

MESSAGE_BYTES = 300
VALUE_POOL = 16_384  # distinct raw values: 4.9 MB, far beyond lz4's window
STALL_S = 30.0  # a consuming stage that sees nothing new for this long has lost messages
FIRST_BATCH_LIMIT_S = 120.0  # the processor's first batch includes the join and the partition load
FROM_FIRST_BATCH = "end of 1st batch"  # the group join, partition load and first fetch excluded

@dataclass
class Cleanup:
    """Every topic and group this run created, deleted at the end whatever happened."""

    topics: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def run(self, admin: AdminClient) -> list[str]:
        """Delete the groups, then the topics; returns what could not be deleted."""
        return delete_groups(admin, self.groups) + delete_topics(admin, self.topics)


# -- 1. raw produce ---------------------------------------------------------------------


def produce_raw(settings: Settings, topic: str, count: int) -> StageResult:
    """Produce ``count`` 300-byte messages as fast as one Python thread can; wait for every ack."""
    # Random values, and enough of them that no value repeats within lz4's 64 KiB window
    # of a partition's batch: the broker receives the full 300 bytes of every message.
    values = [os.urandom(MESSAGE_BYTES) for _ in range(VALUE_POOL)]
    keys = [f"{TENANTS[i % len(TENANTS)]}/agg-{i}".encode() for i in range(10_000)]
    producer = Producer(producer_config(settings))
    start = now_mark(0)
    for i in range(count):
        _produce(producer, topic, values[i % VALUE_POOL], keys[i % len(keys)])
        if (i & 1023) == 0:
            producer.poll(0)  # serve delivery reports so the local queue drains
    remaining = producer.flush(60)
    end = now_mark(count)
    probe = Consumer(consumer_config(settings, f"{topic}.probe"))
    try:
        stored = high_watermarks_total(probe, topic)
    finally:
        probe.close()
    return window_result("produce", "raw produce, idempotent, acks=all", count, min(stored, count - remaining),
                         start, end, start=start, message_bytes=MESSAGE_BYTES, batches=0,
                         timed="first produce to flush", detail=f"records on the topic: {stored:,}",
                         anomalies=mismatches(("records on the topic", stored, count)))


def _produce(producer: Producer, topic: str, value: bytes, key: bytes, partition: int = -1) -> None:
    """Produce one message, serving delivery reports while the local queue is full."""
    while True:
        try:
            producer.produce(topic, value, key, partition=partition)
            return
        except BufferError:
            producer.poll(0.05)


# -- 2. passthrough ---------------------------------------------------------------------


def _consume_batch(consumer: Consumer, batch_size: int) -> list[Message]:
    """One batch of records, without partition-EOF events; other errors raise."""
    messages = consumer.consume(batch_size, 0.02)
    for message in messages:
        error = message.error()
        if error is not None and error.code() != KafkaError._PARTITION_EOF:
            raise KafkaException(error)
    return [m for m in messages if m.error() is None]


def passthrough(settings: Settings, admin: AdminClient, source: str, sink: str, group: str, count: int,
                batch_size: int, *, exactly_once: bool) -> StageResult:
    """Copy ``count`` records from ``source`` to ``sink`` batch by batch, plain or in transactions."""
    consumer = Consumer(consumer_config(settings, group))
    if exactly_once:
        producer = Producer(transactional_producer_config(settings, f"{group}.txn"))
        producer.init_transactions(30)
    else:
        producer = Producer(producer_config(settings))
    clock = BatchClock()
    markers = 0  # each committed transaction writes one control record per partition it touched
    consumer.subscribe([source])
    last_progress = time.monotonic()
    try:
        while clock.total < count and time.monotonic() - last_progress < STALL_S:
            messages = _consume_batch(consumer, batch_size)
            if not messages:
                continue
            if exactly_once:
                markers += _copy_in_transaction(consumer, producer, sink, messages)
            else:
                _copy_then_commit(consumer, producer, sink, messages)
            clock.mark(clock.total + len(messages))
            last_progress = time.monotonic()
        copies = high_watermarks_total(consumer, sink) - markers
    finally:
        consumer.close()
    committed = committed_total(admin, group)
    stage, label = (("passthrough-eos", f"consume→produce, 1 transaction per {batch_size:,}")
                    if exactly_once else
                    ("passthrough-plain", f"consume→produce→flush→commit per {batch_size:,}"))
    return stage_result(stage, label, count, clock, message_bytes=MESSAGE_BYTES, timed=FROM_FIRST_BATCH,
                        detail=f"committed offsets: {committed:,}; copies: {copies:,}",
                        anomalies=mismatches(("committed offsets", committed, count), ("copies", copies, count)))


def _copy_then_commit(consumer: Consumer, producer: Producer, sink: str, messages: list[Message]) -> None:
    """At-least-once: every copy acknowledged before the offsets are committed."""
    for m in messages:
        _produce(producer, sink, m.value() or b"", m.key() or b"", m.partition() or 0)
    if producer.flush(30):
        raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, "copies unacknowledged after 30s"))
    consumer.commit(offsets=next_offsets(messages), asynchronous=False)


def _copy_in_transaction(consumer: Consumer, producer: Producer, sink: str, messages: list[Message]) -> int:
    """Exactly-once: the copies and the consumed offsets commit together; returns partitions written."""
    producer.begin_transaction()
    for m in messages:
        _produce(producer, sink, m.value() or b"", m.key() or b"", m.partition() or 0)
    offsets = next_offsets(messages)
    producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
    producer.commit_transaction(30)
    return len(offsets)  # the copies go to the partition number they came from


# -- 3. the command processor -----------------------------------------------------------


def preload(settings: Settings, commands: list[Envelope]) -> float:
    """Send every command through the SDK producer and wait for the acks; returns the seconds."""
    start = time.perf_counter()
    with CommandProducer(settings) as producer:
        for command in commands:
            producer.send(command)
    return time.perf_counter() - start


def run_processor(settings: Settings, admin: AdminClient, count: int, aggregates: int,
                  profile: cProfile.Profile | None) -> StageResult:
    """Decide ``count`` pre-loaded commands with a fresh processor; timed from its first batch."""
    processor = CommandProcessor(settings, instance_id=unique_prefix("worker"))
    clock = BatchClock()  # started after construction: init_transactions is not counted
    stop = threading.Event()
    watchdog = threading.Thread(target=_stop_when_stalled, args=(stop, clock), daemon=True)

    def on_batch(stats: ProcessorStats) -> None:
        done = stats.commands + stats.dead_lettered
        clock.mark(done)
        if done >= count:
            stop.set()

    watchdog.start()
    try:
        if profile is not None:
            profile.enable()
        processor.run(stop, on_batch)
    finally:
        if profile is not None:
            profile.disable()
        stop.set()
        processor.close()
    s = processor.stats
    committed = committed_total(admin, processor.group_id)
    types = record_types(settings, topic_name(settings, Topic.EVENTS))
    mix = ", ".join(f"{name} {n:,}" for name, n in types.most_common())
    return stage_result(
        "processor", "CommandProcessor, reference domain", count, clock, message_bytes=None,
        timed=FROM_FIRST_BATCH,
        detail=(f"{s.events:,} events ({mix}); {s.rejected:,} rejected (the story rejects "
                f"{aggregates:,}); {s.batches} batches, {s.aborted_batches} aborted; "
                f"committed offsets: {committed:,}"),
        # The outcome mix follows the domain and its policy: printed above, not checked here.
        anomalies=mismatches(("dead-lettered", s.dead_lettered, 0), ("duplicates", s.duplicates, 0),
                             ("committed offsets", committed, count),
                             ("events on the topic", types.total(), s.events))
                  + (("fewer events than decided commands",) if s.events < s.commands else ()),
    )


def _stop_when_stalled(stop: threading.Event, clock: BatchClock) -> None:
    """Set ``stop`` when no batch has completed for too long (commands lost or the worker stuck)."""
    while not stop.wait(1.0):
        last, limit = (clock.marks[-1], STALL_S) if clock.marks else (clock.start, FIRST_BATCH_LIMIT_S)
        if time.perf_counter() - last.wall > limit:
            stop.set()


def processor_settings(partitions: int, batch_size: int) -> Settings:
    """Settings of a processor under a prefix of its own."""
    return Settings().model_copy(update={"topic_prefix": unique_prefix("proc"),
                                         "topic_partitions": partitions,
                                         "processor_batch_size": batch_size})


# -- the run ----------------------------------------------------------------------------


def ratios(results: dict[str, StageResult]) -> dict[str, float]:
    """The ratios the benchmark exists for; "by CPU" compares CPU time per message, which load disturbs less."""
    def ratio(a: str, b: str) -> float:
        return results[a].rate / results[b].rate if a in results and b in results and results[b].rate else 0.0

    def by_cpu(a: str, b: str) -> float:
        ok = a in results and b in results and results[a].cpu_us_per_message
        return results[b].cpu_us_per_message / results[a].cpu_us_per_message if ok else 0.0

    return {
        "processor/passthrough-eos": ratio("processor", "passthrough-eos"),
        "processor/passthrough-eos by CPU": by_cpu("processor", "passthrough-eos"),
        "passthrough-eos/passthrough-plain": ratio("passthrough-eos", "passthrough-plain"),
        "passthrough-eos/produce": ratio("passthrough-eos", "produce"),
    }


def run_stages(settings: Settings, cleanup: Cleanup, messages: int, commands: int, partitions: int,
               batch_size: int, status: Console, profile: cProfile.Profile | None) -> list[StageResult]:
    """Run every stage in order, registering what each creates for cleanup before creating it."""
    admin = AdminClient(admin_config(settings))
    prefix = unique_prefix("raw")
    raw, plain_out, eos_out = f"{prefix}.source", f"{prefix}.plain-out", f"{prefix}.eos-out"
    cleanup.topics += [raw, plain_out, eos_out]
    cleanup.groups += [f"{raw}.probe", f"{prefix}.plain", f"{prefix}.eos"]
    create_topics(admin, [raw, plain_out, eos_out], partitions)
    results = []
    status.log(f"1/3 producing {messages:,} × {MESSAGE_BYTES} B to {raw} ({partitions} partitions)")
    results.append(produce_raw(settings, raw, messages))
    status.log("2/3 passthrough, plain")
    results.append(passthrough(settings, admin, raw, plain_out, f"{prefix}.plain", messages, batch_size,
                               exactly_once=False))
    status.log("2/3 passthrough, exactly-once")
    results.append(passthrough(settings, admin, raw, eos_out, f"{prefix}.eos", messages, batch_size,
                               exactly_once=True))

    proc = processor_settings(partitions, batch_size)
    specs = declared_topics(proc)
    cleanup.topics += [s.name for s in specs]
    cleanup.groups += [f"{proc.topic_prefix}.processor", f"{proc.topic_prefix}.processor.loader"]
    apply_topics(admin, specs)
    aggregates = commands // STORY_LENGTH
    reference = reference_commands(aggregates)
    codec, sample = EnvelopeCodec(), reference[::max(1, len(reference) // 1000)]
    mean_bytes = sum(len(codec.encode(c)) for c in sample) / len(sample)
    status.log(f"3/3 pre-loading {len(reference):,} commands ({aggregates:,} aggregates, "
               f"{len(TENANTS)} tenants, ~{mean_bytes:.0f} B each) under {proc.topic_prefix}")
    sent_s = preload(proc, reference)
    status.log(f"3/3 pre-loaded in {sent_s:.1f}s; deciding")
    result = run_processor(proc, admin, len(reference), aggregates, profile)
    results.append(replace(result, detail=f"{result.detail}; ~{mean_bytes:.0f} B/command; "
                                          f"pre-load (SDK send) {len(reference) / sent_s:,.0f} commands/s"))
    return results


def report(out: Console, env: dict[str, Any], params: dict[str, Any], results: list[StageResult],
           figures: dict[str, float]) -> None:
    """Print the environment, the figures, each stage's cross-checks and the ratios."""
    out.print(environment_table(env, params))
    out.print(results_table("Kafka baseline (msgs/s over the timed window)", results))
    for r in results:
        out.print(f"  {r.stage}: {r.label}; {r.detail}" + "".join(f"\n    [red]{a}[/red]" for a in r.anomalies))
    for name, value in figures.items():
        out.print(f"  ratio {name}: [bold]{value:.3f}[/bold]")


def _trace_everything() -> None:
    """Record every span the processor makes, as a service exporting OTLP would, minus the network."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    tracing.use(provider)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    messages: int = typer.Option(1_000_000, min=10_000, help="Raw messages for the produce and passthrough stages."),
    commands: int = typer.Option(80_000, min=1_000,
                                 help="Commands for the processor stage (rounded down to 5 per aggregate)."),
    partitions: int = typer.Option(6, min=1, help="Partitions of every topic the run creates."),
    batch_size: int = typer.Option(5_000, min=1, help="Records per batch / transaction (passthrough and processor)."),
    json_only: bool = typer.Option(False, "--json-only", help="Print only the final JSON line."),
    profile: Path | None = typer.Option(None, help="Write a cProfile of the processor stage here (slows it)."),
    traced: bool = typer.Option(False, "--tracing", help="Trace the processor stage: OpenTelemetry's SDK with a "
                                "batch span processor, every span sampled, exported to nowhere (no network)."),
) -> None:
    """Measure raw Kafka rates and the command processor on the local broker; print them."""
    private_keys()
    settings = Settings()
    admin = AdminClient(admin_config(settings))
    status = status_console(json_only)
    out = Console(quiet=json_only, width=None if sys.stdout.isatty() else 120)
    env = environment(settings, admin)
    producer = producer_config(settings)
    params = {"messages": messages, "commands": commands - commands % STORY_LENGTH, "partitions": partitions,
              "batch_size": batch_size, "message_bytes": MESSAGE_BYTES,
              "producer": f"acks={producer['acks']} idempotent linger.ms={producer['linger.ms']} "
                          f"compression={producer['compression.type']}",
              "profiled": profile is not None, "tracing": traced}
    if traced:
        _trace_everything()
    profiler = cProfile.Profile() if profile is not None else None
    cleanup = Cleanup()
    results: list[StageResult] = []
    try:
        results = run_stages(settings, cleanup, messages, commands, partitions, batch_size, status, profiler)
    finally:
        problems = cleanup.run(admin)
        for problem in problems:
            status.log(f"[yellow]cleanup: {problem}[/yellow]")
    env["load_avg_1m_end"] = os.getloadavg()[0]
    figures = ratios({r.stage: r for r in results})
    report(out, env, params, results, figures)
    conclude("kafka_baseline", out, status, env, params, results, figures, failure="lost or unaccounted messages",
             profiler=profiler, profile=profile, profiled="the processor stage", json_only=json_only)


if __name__ == "__main__":
    app()
