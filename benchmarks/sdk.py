"""SDK producer: ``CommandProducer`` sending the reference workload, sealing included, against raw produce.

Stages, in one run, each on a throwaway commands topic of its own (deleted at the end):

1. ``raw``: idempotent ``acks=all`` produce (Keel's producer settings, one delivery callback
   per record as the SDK has) of the very bytes the SDK sends, encoded and sealed before
   the clock starts, with the same keys and principal header.
2. ``sdk-plain``: ``CommandProducer`` with the plain codec (no sealing).
3. ``sdk-sealed``: ``CommandProducer`` with a ``SealingCodec`` over a throwaway SQLite key
   store: each story's ``SendEmail`` is sealed for a customer seen for the first time, so
   its data key is created (and stored) during the timed window.
4. ``sdk-sealed-known``: the same again with fresh command ids for the same customers,
   whose keys now exist in the store (and in its cache for those created in the last 5 s).
5. ``sdk-sealed-many``: ``send_many`` of the whole workload with a fresh key store, so all
   subjects are new again: their keys are created a chunk at a time.

Each stage is timed from its first ``send`` (``produce``) to the end of ``flush``. "CPU µs/cmd"
is this process's CPU time over that window (every thread, librdkafka's included) per
command, and "cmds/s per core" is 1e6 over it: the rate one fully busy core would reach,
steadier on a shared machine than the wall-clock rate. Figures are printed, never judged;
the exit status is non-zero only when records are missing or the infrastructure failed.

Run: ``.venv/bin/python benchmarks/sdk.py [--commands N] [--json-only] [--profile FILE]``
against a broker from ``keel up``.
"""

from __future__ import annotations

import cProfile
import gc
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient
from rich.console import Console

from _common import (
    STORY_LENGTH,
    TENANTS,
    StageResult,
    create_topics,
    environment,
    environment_table,
    high_watermarks_total,
    mismatches,
    now_mark,
    conclude,
    reference_commands,
    results_table,
    status_console,
    unique_prefix,
    window_result,
)
from kafka_baseline import Cleanup
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.kafka.clients import admin_config, consumer_config, producer_config
from keel.kafka.topics import Topic, topic_name
from keel.sdk.producer import PRINCIPAL_TENANT_HEADER, CommandProducer
from keel.trust.codec import SealingCodec
from keel.trust.fields import FieldCipher
from keel.trust.keystore import MasterKey
from keel.trust.keystore_sqlite import SqliteKeyStore

FROM_SEND = "first send to flush"


@contextmanager
def sealing_codec() -> Iterator[SealingCodec]:
    """A ``SealingCodec`` over a fresh key store in a temporary folder, under a random master key."""
    with tempfile.TemporaryDirectory(prefix="keel-bench-sdk-") as folder, \
            SqliteKeyStore(Path(folder) / "keys.db", MasterKey(os.urandom(32))) as keys:
        yield SealingCodec(FieldCipher(keys))


def stored(settings: Settings, topic: str, cleanup: Cleanup) -> int:
    """Records on ``topic`` (its high watermarks: the topic is fresh and written without transactions)."""
    group = f"{topic}.probe"
    cleanup.groups.append(group)
    probe = Consumer(consumer_config(settings, group))
    try:
        return high_watermarks_total(probe, topic)
    finally:
        probe.close()


def produce_raw(settings: Settings, topic: str, records: list[tuple[bytes, bytes, bytes]]) -> StageResult:
    """Produce pre-encoded ``(value, key, tenant)`` records as the SDK does, minus everything but ``produce``."""
    producer = Producer(producer_config(settings))
    acknowledged = failed = 0

    def on_delivery(error: KafkaError | None, _message: Message) -> None:
        nonlocal acknowledged, failed
        if error is None:
            acknowledged += 1
        else:
            failed += 1

    start = now_mark(0)
    for value, key, tenant in records:
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=[(PRINCIPAL_TENANT_HEADER, tenant)],
                                 on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(60)
    end = now_mark(len(records))
    return window_result("raw", "raw produce of the SDK's bytes, idempotent, acks=all", len(records),
                         acknowledged, start, end, start=start, message_bytes=None, batches=0, timed=FROM_SEND,
                         detail=f"failed {failed:,}, unacknowledged {remaining:,}")


def send_sdk(settings: Settings, codec: EnvelopeCodec, commands: list[Envelope], stage: str, label: str,
             profile: cProfile.Profile | None, *, many: bool = False) -> StageResult:
    """Send ``commands`` through a ``CommandProducer`` (``send`` each, or ``send_many``), then flush; timed."""
    producer = CommandProducer(settings, codec=codec)
    start = now_mark(0)
    if profile is not None:
        profile.enable()
    try:
        if many:
            producer.send_many(commands)
        else:
            for command in commands:
                producer.send(command)
        acknowledged = producer.flush(60)
    finally:
        if profile is not None:
            profile.disable()
        producer.close()
    end = now_mark(len(commands))
    return window_result(stage, label, len(commands), acknowledged, start, end, start=start, message_bytes=None,
                         batches=0, timed=FROM_SEND)


STAGES = {  # stage: (label, sealed, send_many)
    "sdk-plain": ("CommandProducer.send, plain codec", False, False),
    "sdk-sealed": ("CommandProducer.send, sealed, new subjects (keys created)", True, False),
    "sdk-sealed-known": ("CommandProducer.send, sealed, known subjects", True, False),
    "sdk-sealed-many": ("CommandProducer.send_many, sealed, new subjects (keys created)", True, True),
}


def run_stages(settings: Settings, admin: AdminClient, cleanup: Cleanup, commands: int, partitions: int,
               status: Console, profile: cProfile.Profile | None) -> list[StageResult]:
    """Create the stages' topics (registered for cleanup first), then run and cross-check each stage."""
    prefix = unique_prefix("sdk")
    on = {stage: settings.model_copy(update={"topic_prefix": f"{prefix}-{stage}"}) for stage in ("raw", *STAGES)}
    topics = {stage: topic_name(stage_settings, Topic.COMMANDS) for stage, stage_settings in on.items()}
    cleanup.topics += topics.values()
    create_topics(admin, topics.values(), partitions)
    aggregates = commands // STORY_LENGTH

    def checked(result: StageResult) -> StageResult:
        on_topic = stored(settings, topics[result.stage], cleanup)
        return replace(result, detail=f"{result.detail}; records on the topic: {on_topic:,}".lstrip("; "),
                       anomalies=mismatches(("acknowledged", result.done, result.expected),
                                            ("records on the topic", on_topic, result.expected)))

    status.log(f"encoding {aggregates * STORY_LENGTH:,} commands ({aggregates:,} aggregates, {len(TENANTS)} tenants) "
               "with sealing, for the raw stage")
    with sealing_codec() as codec:
        raw = [(codec.encode(c), c.key.encode(), c.tenant_id.encode()) for c in reference_commands(aggregates)]
    mean_bytes = sum(len(v) for v, _, _ in raw) / len(raw)
    status.log(f"raw: produce of the sealed commands' bytes (~{mean_bytes:.0f} B each)")
    results = [checked(produce_raw(on["raw"], topics["raw"], raw))]
    del raw
    plain = EnvelopeCodec()
    with sealing_codec() as once, sealing_codec() as batched:
        codecs = {"sdk-plain": plain, "sdk-sealed": once, "sdk-sealed-known": once, "sdk-sealed-many": batched}
        for stage, (label, sealed, many) in STAGES.items():
            status.log(f"{stage}: {label}")
            workload = reference_commands(aggregates)  # fresh ids; the same customers each time
            gc.collect()
            results.append(checked(send_sdk(on[stage], codecs[stage], workload, stage, label,
                                            profile if sealed else None, many=many)))
    return results


def per_core(results: list[StageResult]) -> dict[str, float]:
    """Commands/s one fully busy core would reach in each stage (1e6 / CPU µs per command)."""
    return {r.stage: 1e6 / r.cpu_us_per_message for r in results if r.cpu_us_per_message}


def ratios(results: dict[str, StageResult]) -> dict[str, float]:
    """Each SDK stage against raw produce of the same bytes, by CPU per command (raw µs / stage µs)."""
    raw = results.get("raw")
    return {f"{stage}/raw by CPU": raw.cpu_us_per_message / r.cpu_us_per_message
            for stage, r in results.items() if raw is not None and stage != "raw" and r.cpu_us_per_message}


app = typer.Typer(add_completion=False)


@app.command()
def main(
    commands: int = typer.Option(20_000, min=1_000, help="Commands per stage (rounded down to 5 per aggregate)."),
    partitions: int = typer.Option(6, min=1, help="Partitions of every topic the run creates."),
    json_only: bool = typer.Option(False, "--json-only", help="Print only the final JSON line."),
    profile: Path | None = typer.Option(None, help="Write a cProfile of the sealed SDK stages here (slows them)."),
) -> None:
    """Measure the SDK producer, sealing included, beside raw produce of the same bytes; print the figures."""
    settings = Settings()
    admin = AdminClient(admin_config(settings))
    status = status_console(json_only)
    out = Console(quiet=json_only, width=None if sys.stdout.isatty() else 120)
    env = environment(settings, admin)
    status.log(f"start: load average (1 min) {env['load_avg_1m_start']:.2f}, {env['usable_cores']} usable cores, "
               f"broker {env['broker']}, librdkafka {env['librdkafka']}")
    config = producer_config(settings)
    params: dict[str, Any] = {
        "commands": commands - commands % STORY_LENGTH, "partitions": partitions,
        "producer": f"acks={config['acks']} idempotent linger.ms={config['linger.ms']} "
                    f"compression={config['compression.type']}",
        "key_store": "SQLite, temporary folder", "profiled": profile is not None}
    profiler = cProfile.Profile() if profile is not None else None
    cleanup = Cleanup()
    results: list[StageResult] = []
    try:
        results = run_stages(settings, admin, cleanup, commands, partitions, status, profiler)
    finally:
        for problem in cleanup.run(admin):
            status.log(f"[yellow]cleanup: {problem}[/yellow]")
    env["load_avg_1m_end"] = os.getloadavg()[0]
    cores = per_core(results)
    figures = {**{f"{stage} cmds/s per core": rate for stage, rate in cores.items()},
               **ratios({r.stage: r for r in results})}
    out.print(environment_table(env, params))
    out.print(results_table("SDK producer (commands/s from the first send to the end of flush)", results))
    for r in results:
        out.print(f"  {r.stage}: {r.label}; {r.detail}; [bold]{cores.get(r.stage, 0):,.0f}[/bold] cmds/s per core"
                  + "".join(f"\n    [red]{a}[/red]" for a in r.anomalies))
    for name, value in ratios({r.stage: r for r in results}).items():
        out.print(f"  ratio {name}: [bold]{value:.3f}[/bold]")
    conclude("sdk", out, status, env, params, results, figures, failure="missing or unacknowledged records",
             profiler=profiler, profile=profile, profiled="the sealed SDK stages", json_only=json_only, top=25)


if __name__ == "__main__":
    app()
