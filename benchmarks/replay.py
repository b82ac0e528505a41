"""Replay benchmark: rebuilding the events projection into ClickHouse, against a raw consume.

Stages, in one run, on throwaway topics (deleted at the end) and a throwaway chDB path:

1. ``produce``: N encoded events (a few real ones, re-identified by byte substitution).
2. ``consume-raw``: a ``read_committed`` consumer reads all N, nothing decoded: the ceiling.
3. ``rebuild``: ``keel.replay.rebuild`` of ``events`` (shadow, swap, dependents) from Kafka,
   reported as events/s and as a ratio of ``consume-raw``.
4. ``lag``: the projector follows the topic (``linger_s`` as configured) while events arrive
   at a fixed rate (default 20,000/s, about the command processor's output in the Kafka
   baseline); a probe polls the row count, and each event's lag is the time from its
   delivery acknowledgement to the first probe that sees it. Reported as p50/p99/max.

Figures are printed, never judged. Run ``.venv/bin/python benchmarks/replay.py`` against a
broker from ``keel up``.
"""

from __future__ import annotations

import bisect
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import typer
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from _common import environment, private_keys, status_console, unique_prefix
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, DelegationLink, new_command
from support_desk.messages import CancelSubscription, IssueRefund, SendEmail, StartSubscription
from keel.domain.outcomes import to_events
from keel.domain.aggregate import EMPTY as INITIAL, evolve_aggregate as evolve
from keel.domain.deciding import decide
from keel.kafka.clients import admin_config, consumer_config, producer_config
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations
from keel.projector.projector import EventProjector
from keel.replay.rebuild import rebuild



app = typer.Typer(add_completion=False)


def templates() -> list[tuple[bytes, bytes, bytes]]:
    """(encoded event, its id as text, its tenant) for one story per tenant."""
    codec, found = EnvelopeCodec(), []
    agent = Actor(kind=ActorKind.AGENT, id="support-bot")
    lead = DelegationLink(actor=Actor(kind=ActorKind.HUMAN, id="jane.lead"), reason="customer asked")
    for tenant in ("acme", "globex", "initech", "umbrella"):
        state = INITIAL
        for payload in (StartSubscription(customer_id="c-1", plan="pro", monthly_price_cents=4900, currency="EUR"),
                        IssueRefund(amount_cents=1000, currency="EUR", reason="late"),
                        SendEmail(to_address="c@example.com", template="sorry", body="Sorry"),
                        CancelSubscription(reason="asked"),
                        IssueRefund(amount_cents=10**9, currency="EUR", reason="too much")):
            command = new_command(payload, tenant_id=tenant, aggregate_id="agg-000000", actor=agent,
                                  delegation=(lead,), on_behalf_of="c-1")
            for event in to_events(command, decide(command, state), version=state.version, now=command.occurred_at):
                state = evolve(state, event)
                found.append((codec.encode(event), str(event.id).encode(), tenant.encode()))
    return found


def values(count: int, seed: int) -> list[tuple[bytes, bytes]]:
    """``count`` distinct (key, value) events."""
    rng, pool, out = random.Random(seed), templates(), []
    for n in range(count):
        value, old_id, tenant = pool[n % len(pool)]
        aggregate = f"agg-{rng.randrange(10**6):06d}".encode()
        value = value.replace(old_id, str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode())
        out.append((tenant + b"/" + aggregate, value.replace(b"agg-000000", aggregate)))
    return out


def produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]], rate: float | None = None,
            acked: list[float] | None = None) -> float:
    """Produce ``records`` (at ``rate``/s if given); returns seconds; ``acked`` gets each ack time."""
    producer = Producer(producer_config(settings))
    started = time.perf_counter()

    def delivered(err: object, _msg: object) -> None:
        if err is None and acked is not None:
            acked.append(time.perf_counter())

    for n, (key, value) in enumerate(records):
        if rate is not None:
            ahead = started + n / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        while True:
            try:
                producer.produce(topic, value, key=key, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)
    return time.perf_counter() - started


def consume_raw(settings: Settings, topic: str, count: int) -> float:
    """Seconds to read ``count`` records without decoding them."""
    consumer = Consumer(consumer_config(settings, f"{settings.topic_prefix}.raw", **{"fetch.max.bytes": 64 << 20}))
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    seen, started = 0, time.perf_counter()
    while seen < count:
        seen += sum(1 for m in consumer.consume(10_000, timeout=0.5) if m.error() is None)
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def measure_lag(settings: Settings, topic: str, rate: float, seconds: float, linger_s: float) -> list[float]:
    """Each event's delivery-to-visible lag while the projector follows ``rate`` events/s."""
    client, probe = connect(settings), connect(settings)
    acked: list[float] = []
    visible: list[tuple[float, int]] = []
    stop, done = threading.Event(), threading.Event()
    base = int(probe.query("SELECT count() FROM events").result_rows[0][0])
    with EventProjector(settings, client, linger_s=linger_s) as projector:
        follower = threading.Thread(target=projector.run, args=(stop,))
        follower.start()
        def send() -> None:
            produce(settings, topic, values(int(rate * seconds), seed=5), rate=rate, acked=acked)
            done.set()

        producer = threading.Thread(target=send)
        producer.start()
        target = int(rate * seconds)
        while True:
            seen = int(probe.query("SELECT count() FROM events").result_rows[0][0]) - base
            visible.append((time.perf_counter(), seen))
            if done.is_set() and seen >= target:
                break
            time.sleep(0.02)
        stop.set()
        follower.join(30)
        producer.join(30)
    client.close()
    probe.close()
    counts = [n for _, n in visible]
    acked.sort()
    return [visible[bisect.bisect_left(counts, k + 1)][0] - t for k, t in enumerate(acked)]


@app.command()
def main(
    events: int = typer.Option(500_000, min=10_000, help="Events to rebuild."),
    partitions: int = typer.Option(6, min=1, help="Partitions of the events topic."),
    lag_rate: float = typer.Option(20_000, help="Events/s during the lag stage (0 skips it)."),
    lag_seconds: float = typer.Option(15, help="Seconds of load during the lag stage."),
    linger: float = typer.Option(0.1, help="The projector's linger_s during the lag stage (its default)."),
    json_only: bool = typer.Option(False, "--json-only", help="Print only the final JSON line."),
) -> None:
    """Measure rebuild throughput and projection lag; print them with a raw-consume baseline."""
    private_keys()
    status = status_console(json_only)
    base = Settings()
    admin = AdminClient(admin_config(base))
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as scratch:
        settings = base.model_copy(update={"topic_prefix": unique_prefix("replay"), "topic_partitions": partitions,
                                           "clickhouse_dsn": f"chdb://{Path(scratch) / 'chdb'}",
                                           "clickhouse_database": "bench"})
        specs = declared_topics(settings)
        apply_topics(admin, specs)
        topic = topic_name(settings, Topic.EVENTS)
        figures: dict[str, float] = {}
        try:
            records = values(events, seed=1)
            status.log(f"producing {events:,} events to {topic}")
            figures["produce_per_s"] = events / produce(settings, topic, records)
            del records
            status.log("consuming raw")
            figures["consume_raw_per_s"] = events / consume_raw(settings, topic, events)
            client = connect(settings)
            apply_migrations(client)
            status.log("rebuilding events into ClickHouse")
            started = time.perf_counter()
            report = rebuild(settings, client, "events")
            figures["rebuild_s"] = time.perf_counter() - started
            client.close()
            assert report.rows == events, f"rebuilt {report.rows} rows of {events}"
            figures["rebuild_per_s"] = events / figures["rebuild_s"]
            figures["rebuild_over_consume_raw"] = figures["rebuild_per_s"] / figures["consume_raw_per_s"]
            if lag_rate > 0:
                status.log(f"lag: {lag_rate:,.0f} events/s for {lag_seconds:.0f}s, linger {linger}s")
                lags = sorted(measure_lag(settings, topic, lag_rate, lag_seconds, linger))
                figures["lag_p50_s"] = statistics.median(lags)
                figures["lag_p99_s"] = lags[int(0.99 * (len(lags) - 1))]
                figures["lag_max_s"] = lags[-1]
        finally:
            admin.delete_topics([s.name for s in specs])
    env = environment(base, admin)
    out = Console(quiet=json_only)
    table = Table("figure", "value", title="replay benchmark")
    for name, value in figures.items():
        table.add_row(name, f"{value:,.3f}" if value < 100 else f"{value:,.0f}")
    out.print(table)
    sys.stdout.write(json.dumps({"benchmark": "replay", "env": env,
                                 "params": {"events": events, "partitions": partitions, "lag_rate": lag_rate,
                                            "lag_seconds": lag_seconds, "linger_s": linger},
                                 "figures": {k: round(v, 4) for k, v in figures.items()}}) + "\n")


if __name__ == "__main__":
    app()
