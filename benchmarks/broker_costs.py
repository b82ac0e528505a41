"""What the broker's CPU pays for: an empty fetch, a produce request, a transaction.

Keel's services talk to the broker in small requests: a relay round, a processor or chainer
transaction, a consumer's fetch. The broker's cost is mostly per request, not per record,
so this measures the broker's JVM (its process's CPU, from ``/proc``) while one kind of
request runs alone against it, on a throwaway topic of six partitions:

1. ``idle``: nothing: the broker's own background work, measured first and last; their mean
   is subtracted from every stage.
2. ``empty fetches``: ten ``read_committed`` consumers on the empty topic with
   ``fetch.wait.max.ms`` 100 (the batched readers' wait), then 1,000 (the controls followers').
3. ``produce requests``: one record to one partition, flushed each time (librdkafka sends one
   produce request per partition: a relay round writing six partitions sends six).
4. ``transactions``: begin, one record to each of 1 or 6 partitions, the offsets of a consumer
   group, commit; 10 ms apart, as a transactional worker's loop does them.

Each stage runs ``--seconds`` after a 3 s warm-up and prints the broker's cores, operations
a second and CPU µs per operation beyond the idle stage's. Figures are printed, never judged.
Run after ``keel up``: ``.venv/bin/python benchmarks/broker_costs.py`` (about two minutes);
the broker must be a local process (its CPU is read from ``/proc``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import typer
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from _common import create_topics, delete_groups, delete_topics, environment, listening_pid, unique_prefix
from keel.config import Settings
from keel.kafka.clients import admin_config, consumer_config, producer_config, transactional_producer_config

PARTITIONS = 6
Work = Callable[[threading.Event, list[int]], None]


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(broker: int, work: Work, seconds: float) -> tuple[float, float]:
    """Run ``work`` (it counts its operations into its list) for 3 s, then ``seconds`` timed: (cores, ops/s)."""
    stop, done = threading.Event(), [0]
    thread = threading.Thread(target=work, args=(stop, done))
    thread.start()
    try:
        time.sleep(3)
        cpu, ops, wall = process_cpu_seconds(broker), done[0], time.monotonic()
        time.sleep(seconds)
        cpu, ops, wall = process_cpu_seconds(broker) - cpu, done[0] - ops, time.monotonic() - wall
    finally:
        stop.set()
        thread.join()
    return cpu / wall, ops / wall


def idle(stop: threading.Event, _done: list[int]) -> None:
    stop.wait()


def empty_fetches(settings: Settings, topic: str, wait_ms: int, groups: list[str]) -> Work:
    def run(stop: threading.Event, done: list[int]) -> None:
        fetches: dict[int, int] = {}  # consumer -> fetch requests sent so far, from librdkafka's statistics

        def counter(index: int) -> Callable[[str], None]:
            def count(raw: str) -> None:
                brokers = json.loads(raw)["brokers"].values()
                fetches[index] = sum(b.get("req", {}).get("Fetch", 0) for b in brokers if b.get("nodeid", -1) >= 0)
                done[0] = sum(fetches.values())
            return count

        consumers = []
        for index in range(10):
            groups.append(f"{settings.topic_prefix}.fetch-{wait_ms}-{index}")
            consumer = Consumer(consumer_config(settings, groups[-1], **{
                "fetch.wait.max.ms": wait_ms, "statistics.interval.ms": 1000, "stats_cb": counter(index)}))
            consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
            consumers.append(consumer)
        try:
            while not stop.is_set():
                for consumer in consumers:
                    consumer.consume(100, 0.01)  # serves the statistics callback too
        finally:
            for consumer in consumers:
                consumer.close()
    return run


def produce_requests(settings: Settings, topic: str) -> Work:
    def run(stop: threading.Event, done: list[int]) -> None:
        producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        while not stop.is_set():
            producer.produce(topic, b"x" * 300, b"key", partition=0)
            producer.flush(10)
            done[0] += 1
    return run


def transactions(settings: Settings, topic: str, partitions: int, groups: list[str]) -> Work:
    def run(stop: threading.Event, done: list[int]) -> None:
        groups.append(f"{settings.topic_prefix}.txn-{partitions}")
        consumer = Consumer(consumer_config(settings, groups[-1]))
        producer = Producer(transactional_producer_config(settings, f"{settings.topic_prefix}.txn-{partitions}"))
        producer.init_transactions(30)
        offsets = [TopicPartition(topic, 0, 0)]
        try:
            while not stop.is_set():
                producer.begin_transaction()
                for partition in range(partitions):
                    producer.produce(topic, b"x" * 300, b"key", partition=partition)
                producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
                producer.commit_transaction(30)
                done[0] += 1
                time.sleep(0.01)
        finally:
            consumer.close()
    return run


def main(seconds: float = typer.Option(20.0, min=5, help="Timed seconds per stage."),
         json_only: bool = typer.Option(False, help="Print only the final JSON line.")) -> None:
    console = Console(stderr=True, quiet=json_only)
    settings = Settings(topic_prefix=unique_prefix("broker-costs"))
    admin = AdminClient(admin_config(settings))
    env = environment(settings, admin)
    broker = listening_pid(int(settings.bootstrap_servers.split(",")[0].rsplit(":", 1)[1]))
    if broker is None:
        raise SystemExit(f"no local process listens on {settings.bootstrap_servers}: start the broker (keel up)")
    topic, fetched = f"{settings.topic_prefix}.costs", f"{settings.topic_prefix}.empty"
    groups: list[str] = []
    stages: list[tuple[str, str, Work]] = [
        ("idle", "-", idle),
        ("empty fetches, 100 ms wait", "fetch", empty_fetches(settings, fetched, 100, groups)),
        ("empty fetches, 1 s wait", "fetch", empty_fetches(settings, fetched, 1000, groups)),
        ("produce requests", "request", produce_requests(settings, topic)),
        ("transactions, 1 partition", "transaction", transactions(settings, topic, 1, groups)),
        ("transactions, 6 partitions", "transaction", transactions(settings, topic, 6, groups)),
        ("idle again", "-", idle),
    ]
    figures: list[dict[str, Any]] = []
    try:
        create_topics(admin, [topic, fetched], PARTITIONS)
        for name, unit, work in stages:
            console.print(f"{name} …")
            cores, rate = measured(broker, work, seconds)
            figures.append({"stage": name, "unit": unit, "cores": cores, "per_s": rate})
        baseline = (figures[0]["cores"] + figures[-1]["cores"]) / 2
        for figure in figures:
            figure["us_per_op"] = (figure["cores"] - baseline) / figure["per_s"] * 1e6 if figure["per_s"] else None
    finally:
        problems = delete_topics(admin, [topic, fetched]) + delete_groups(admin, groups)
    env["load_avg_1m_end"] = os.getloadavg()[0]
    table = Table(title=f"the broker's CPU per request (load {env['load_avg_1m_start']:.1f} → "
                        f"{env['load_avg_1m_end']:.1f})")
    for column in ("stage", "broker cores", "per second", "broker µs each, beyond idle"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for figure in figures:
        each = figure["us_per_op"]
        table.add_row(figure["stage"], f"{figure['cores']:.3f}", f"{figure['per_s']:,.1f} {figure['unit']}",
                      "-" if each is None else f"{each:,.0f}")
    console.print(table)
    for problem in problems:
        console.print(f"[red]{problem}[/red]")
    print(json.dumps({"benchmark": "broker_costs", "ok": not problems, "env": env,
                      "params": {"seconds": seconds, "partitions": PARTITIONS}, "figures": figures,
                      "problems": problems}, separators=(",", ":")))


if __name__ == "__main__":
    typer.run(main)
