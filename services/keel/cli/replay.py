"""``keel replay`` (a topic range, filtered, into a file, a topic or a table) and ``keel state``.

``register`` adds the command to the main typer app. Run the same command again to resume an
interrupted replay: its checkpoint (under ``<data_dir>/replays/`` unless ``--checkpoint``
names one) says where it stopped. Republishing into a live Keel topic needs ``--allow-live``
and the topic's name typed again (or given with ``--confirm``).

What a person reads (``keel state``, a JSON-lines replay file) shows personal values as
``keel.trust.reveal`` says: ``⟨sealed⟩``, ``⟨erased⟩``, or plaintext with ``--reveal --as kind:id``,
each tenant's audit chain recording that read. Avro files, topics and tables copy ciphertext.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, is_dataclass
from functools import partial
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from keel.cli import output
from keel.cli.trust import Reveal, RevealAs, revealer
from keel.config import Settings
from keel.domain.aggregate import EMPTY, AggregateState, evolve_aggregate
from keel.domain.envelope import Envelope
from keel.kafka.topics import Topic, topic_name
from keel.projector.clickhouse import connect
from keel.query.scope import exposed
from keel.replay.engine import ReplayJob, ReplayProgress, guard_target_topic, live_topics, replay
from keel.replay.errors import ReplayError
from keel.replay.range import Bound, Filter
from keel.replay.sinks import AvroFileSink, JsonLinesSink, Sink, TableSink, TopicSink
from keel.replay.state import parse_at, state_at, unprojected_events
from keel.trust.reveal import Disclosure, open_reader, record_reads

_out = Console()
_err = Console(stderr=True)


class FileFormat(StrEnum):
    """The file a replay writes."""

    JSONL = "jsonl"
    AVRO = "avro"


def register(app: typer.Typer) -> None:
    """Add ``keel replay`` and ``keel state`` to ``app``."""
    app.command("replay")(replay_command)
    app.command("state")(state_command)


def state_command(
    tenant: Annotated[str, typer.Option(help="The aggregate's tenant.")],
    aggregate: Annotated[str, typer.Option(help="The aggregate id.")],
    at: Annotated[str, typer.Option(help="A version (e.g. 3) or an ISO-8601 time.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    reveal: Reveal = False,
    acting: RevealAs = None,
) -> None:
    """Print an aggregate's state as it was at a version or a time, and the events that led there.

    Events the projection does not hold yet are read from Kafka, and the output says how many.
    The state is folded from the events as printed, so it holds no ciphertext either.
    """
    who = revealer(reveal, acting)
    settings = Settings()
    client = connect(settings)
    with open_reader(settings, reveal=who is not None) as reader:
        shown: dict[uuid.UUID, Envelope] = {}

        def read(event: Envelope) -> Envelope:
            if event.id not in shown:
                shown[event.id] = reader.envelope(event)
            return shown[event.id]

        def evolve(state: AggregateState, event: Envelope) -> AggregateState:
            return evolve_aggregate(state, read(event))

        try:
            when = parse_at(at)
            tail = unprojected_events(settings, client, tenant, aggregate)
            found = state_at(client, tenant, aggregate, when, evolve=evolve, initial=EMPTY, tail=tail)
        finally:
            client.close()
        events = [read(event) for event in found.events]
        if who is not None:  # recorded before anything revealed is printed
            record_reads(settings, reader.take(), actor=who, via="keel state")
    state = _plain_mapping(_shown_state(found.state))
    if as_json:
        sys.stdout.write(json.dumps({"state": state, "events": [e.model_dump(mode="json") for e in events],
                                     "unprojected_events": found.unprojected}) + "\n")
        return
    history = Table("version", "type", "occurred_at", "actor", "payload", title=f"{tenant}/{aggregate} up to {at}")
    for event in events:
        history.add_row(str(event.version or "-"), event.type, event.occurred_at.isoformat(),
                        f"{event.actor.kind.value}:{event.actor.id}",
                        json.dumps(event.payload.model_dump(mode="json"), ensure_ascii=False))
    output.console().print(output.fold(history))
    facts = Table("field", "value", title="state")
    for key, value in state.items():
        facts.add_row(key, str(value))
    output.console().print(output.fold(facts))
    if found.unprojected:
        output.console().print(f"{found.unprojected} of {tenant}/{aggregate}'s events are not projected yet; "
                               "they were read from Kafka", highlight=False)


def _shown_state(state: AggregateState) -> dict[str, object]:
    """The aggregate's version and type, its domain's fields, and the commands parked on it."""
    domain = state.domain
    fields: dict[str, object]
    if is_dataclass(domain) and not isinstance(domain, type):
        fields = asdict(domain)
    elif isinstance(domain, BaseModel):
        fields = domain.model_dump()
    else:
        fields = {} if domain is None else {"state": domain}
    return {"version": state.version, "aggregate_type": state.aggregate, **fields,
            "pending_approvals": sorted(str(command_id) for command_id in state.pending)}


def _plain(value: object) -> object:
    """JSON-able: mappings with text keys, sequences as lists, enums, dates and ids as text."""
    if isinstance(value, dict):
        return _plain_mapping(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(item) for item in value]
    return value if isinstance(value, (int, float, bool)) or value is None else str(value)


def _plain_mapping(value: Mapping[Any, object]) -> dict[str, object]:
    """A mapping made JSON-able, its keys as text."""
    return {str(key): _plain(item) for key, item in value.items()}


def replay_command(
    source: Annotated[str, typer.Option("--topic", help="events, commands, or a full topic name.")] = "events",
    start: Annotated[str, typer.Option("--from", help="beginning, offset:N or an ISO-8601 time.")] = "beginning",
    end: Annotated[str, typer.Option("--to", help="end, offset:N or an ISO-8601 time (exclusive).")] = "end",
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's records.")] = None,
    aggregate: Annotated[str | None, typer.Option(help="Only this aggregate's records.")] = None,
    types: Annotated[list[str] | None, typer.Option("--type", help="Only these event types (repeatable).")] = None,
    actor: Annotated[str | None, typer.Option(help="Only records of this actor id.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file.")] = None,
    file_format: Annotated[FileFormat, typer.Option("--format", help="File format.")] = FileFormat.JSONL,
    to_topic: Annotated[str | None, typer.Option("--to-topic", help="Produce to this topic.")] = None,
    to_table: Annotated[str | None, typer.Option("--to-table", help="Insert into this ClickHouse table.")] = None,
    allow_live: Annotated[bool, typer.Option("--allow-live", help="Allow a live Keel topic as target.")] = False,
    confirm: Annotated[str | None, typer.Option("--confirm", help="The live target topic's name, again.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint file (resume by rerunning).")] = None,
    reveal: Reveal = False,
    acting: RevealAs = None,
) -> None:
    """Replay a range of a topic, filtered, into a file, a topic or a ClickHouse table (resumable).

    A JSON-lines file is for people: its personal values read ⟨sealed⟩ or ⟨erased⟩, or plaintext with
    --reveal --as. An Avro file, a topic and a table copy the records as stored (ciphertext).
    """
    who = revealer(reveal, acting)
    settings = Settings()
    targets = [t for t in (out, to_topic, to_table) if t is not None]
    if len(targets) != 1:
        raise ReplayError("pick exactly one target: --out FILE, --to-topic TOPIC or --to-table TABLE",
                          code="bad_target")
    if who is not None and (out is None or file_format is not FileFormat.JSONL):
        raise ReplayError("--reveal writes plaintext only to a JSON-lines file (--out FILE), never into a topic, "
                          "a table or an Avro copy", code="bad_target")
    topic = topic_name(settings, Topic(source)) if source in {t.value for t in Topic} else source
    job = ReplayJob(topic=topic, start=Bound.parse(start), end=Bound.parse(end),
                    filter=Filter(tenant=tenant, aggregate=aggregate, types=frozenset(types or ()), actor=actor),
                    target=str(targets[0]))
    if to_topic is not None:
        _confirm_live(settings, to_topic, allow_live, confirm)
    path = checkpoint or settings.data_dir / "replays" / f"{job.fingerprint[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    client = connect(settings) if to_table is not None else None
    with ExitStack() as resources:
        sink: Sink
        if out is not None and file_format is FileFormat.JSONL:
            reader = resources.enter_context(open_reader(settings, reveal=who is not None))
            record: Callable[[Sequence[Disclosure]], None] = lambda _reads: None
            if who is not None:
                record = partial(record_reads, settings, actor=who, via=f"keel replay of {topic}")
            sink = JsonLinesSink(out, reader, record)
        elif out is not None:
            sink = AvroFileSink(out)
        elif to_topic is not None:
            sink = TopicSink(settings, to_topic)
        else:
            assert client is not None and to_table is not None
            if to_table in exposed() or to_table.startswith("_") or "__" in to_table:
                raise ReplayError(f"{to_table} is a live projection; replay into a new table", code="live_target")
            sink = TableSink(client, to_table, topic)
        try:
            progress = _run(settings, job, sink, path)
        finally:
            sink.close()
            if client is not None:
                client.close()
    path.unlink(missing_ok=True)  # finished: a rerun starts afresh
    _out.print(f"replayed {progress.kept} of {progress.read} records of {topic} into {targets[0]}")


def _run(settings: Settings, job: ReplayJob, sink: Sink, checkpoint: Path) -> ReplayProgress:
    with Progress(TextColumn("replaying {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]:,.0f} rec/s, kept {task.fields[kept]:,}"),
                  TimeRemainingColumn(), console=_err) as bar:
        task = bar.add_task(job.topic, total=None, rate=0.0, kept=0)
        started = time.monotonic()

        def show(progress: ReplayProgress) -> None:
            bar.update(task, total=progress.total, completed=progress.read, kept=progress.kept,
                       rate=progress.read / max(time.monotonic() - started, 1e-6))

        return replay(settings, job, sink, checkpoint=checkpoint, on_progress=show)


def _confirm_live(settings: Settings, topic: str, allow_live: bool, confirm: str | None) -> None:
    guard_target_topic(settings, topic, allow_live=allow_live)
    if topic not in live_topics(settings):
        return
    typed = confirm if confirm is not None else typer.prompt(
        f"{topic} is LIVE: consumers will see these records again. Type its name to go on")
    if typed != topic:
        raise ReplayError("the confirmation did not match the live topic's name; nothing was replayed",
                          code="not_confirmed")
