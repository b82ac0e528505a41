"""The outbox relay's CPU per published command, beside raw Kafka produce of the same records.

An outbox (SQLite, as ``keel up`` has it) holds ``--rows`` commands of the reference story.
Two stages, in one run, on throwaway topics:

1. ``kafka-raw``: a producer with the relay's configuration sends the same values under the same
   keys, ``--batch`` at a time, each batch flushed: what a relay round costs in Kafka alone.
2. ``relay``: ``Relay.run_once`` until the outbox is empty, ``--batch`` rows a round (the
   ``KEEL_RELAY_BATCH_SIZE`` of the run; at 2,500 commands/s a relay round carries about 60):
   read the unsent rows, produce them, wait for Kafka's acknowledgements, mark them published,
   and keep the lease.

Each stage prints this process's CPU per row (every thread, librdkafka's included), so what
the relay adds to Kafka's own cost shows; figures are printed, never judged. The exit status
is 1 only when a row was not published. Run: ``.venv/bin/python benchmarks/relay.py`` after
``keel up``; the data dir is a temporary one, removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from _common import (create_topics, delete_topics, environment, high_watermarks_total, reference_commands,
                     unique_prefix)
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.gateway.settings import IngressSettings
from keel.kafka.clients import admin_config, consumer_config, producer_config
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.enqueue import to_new_command
from keel.outbox.models import NewCommand
from keel.outbox.store import OutboxStore
from keel.relay.relay import Relay


def timed(stage: str, rows: int, run: Any) -> dict[str, Any]:
    """Run ``run()``; its wall time, rate and this process's CPU per row."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"stage": stage, "rows": rows, "seconds": wall, "rows_per_s": rows / wall, "cpu_us_per_row": cpu / rows * 1e6}


def raw_produce(settings: Settings, topic: str, commands: list[NewCommand], batch: int) -> None:
    """The rows' values under their keys, ``batch`` at a time, each batch flushed, as a relay round does."""
    producer = Producer(producer_config(settings))
    for start in range(0, len(commands), batch):
        for command in commands[start:start + batch]:
            producer.produce(topic, value=command.value, key=command.key.encode())
        producer.flush(30)


def main(rows: int = typer.Option(20_000, min=100, help="Commands in the outbox."),
         batch: int = typer.Option(60, min=1, help="Rows a relay round (KEEL_RELAY_BATCH_SIZE)."),
         json_only: bool = typer.Option(False, help="Print only the final JSON line.")) -> None:
    console = Console(stderr=True, quiet=json_only)
    root = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    settings = Settings(data_dir=root, topic_prefix=unique_prefix("relay"))
    admin = AdminClient(admin_config(settings))
    env = environment(settings, admin)
    commands_topic, raw_topic = topic_name(settings, Topic.COMMANDS), f"{settings.topic_prefix}.raw"
    codec = EnvelopeCodec()
    commands = [to_new_command(c, codec.encode(c), "0" * 64) for c in reference_commands(rows // 5 + 1)][:rows]
    store = OutboxStore(open_database(f"sqlite:///{root / 'outbox.sqlite3'}"))
    relay: Relay | None = None
    problems: list[str] = []
    try:
        create_topics(admin, [commands_topic, raw_topic], settings.topic_partitions)
        store.migrate()
        for start in range(0, len(commands), 500):
            store.accept(commands[start:start + 500])
        console.print(f"{rows:,} commands in the outbox; {batch} a round")
        figures = [timed("kafka-raw", rows, lambda: raw_produce(settings, raw_topic, commands, batch))]
        relay = Relay(store, settings, IngressSettings(relay_batch_size=batch))

        def drain() -> None:
            assert relay is not None
            while relay.run_once():
                pass

        figures.append(timed("relay", rows, drain))
        figures[-1]["rounds"] = relay.stats.rounds
        counter = Consumer(consumer_config(settings, f"{settings.topic_prefix}.count"))
        try:
            published = high_watermarks_total(counter, commands_topic)
        finally:
            counter.close()
        if published != rows or store.unsent(1):
            problems.append(f"{published:,} records on {commands_topic} for {rows:,} commands")
    finally:
        if relay is not None:
            relay.close()
        store.db.close()
        problems += delete_topics(admin, [commands_topic, raw_topic])
        shutil.rmtree(root, ignore_errors=True)
    raw = figures[0]["cpu_us_per_row"]
    table = Table(title=f"the outbox relay (load {os.getloadavg()[0]:.1f} at the end)")
    for column in ("stage", "rows", "rows/s", "CPU µs/row", "× raw"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for figure in figures:
        table.add_row(figure["stage"], f"{figure['rows']:,}", f"{figure['rows_per_s']:,.0f}",
                      f"{figure['cpu_us_per_row']:.1f}", f"{figure['cpu_us_per_row'] / raw:.1f}")
    console.print(table)
    for problem in problems:
        console.print(f"[red]{problem}[/red]")
    env["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps({"benchmark": "relay", "ok": not problems, "env": env, "params": {"rows": rows, "batch": batch},
                      "figures": figures, "problems": problems}, separators=(",", ":")))
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    typer.run(main)
