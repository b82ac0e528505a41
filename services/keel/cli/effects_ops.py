"""``keel effects list|show|retry|cancel``: what effects are doing, and the operator's levers.

``list`` and ``show`` read the status store: what the status tracker folded from events
and workers' reports, as of the last record it applied. ``retry`` and ``cancel`` are
commands to the effect's aggregate, decided by the processor and recorded in the tenant's
audit chain like approvals and kill switches. They check the store first, to refuse at
once what is plainly wrong there, but the processor decides; ``--wait`` prints its answer.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Annotated

import typer
from confluent_kafka import Consumer, TopicPartition

from keel.cli import output
from keel.cli.governance import acting_actor
from keel.cli.output import AsJson
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.commands import CancelEffect, RetryEffect
from keel.domain.envelope import Authority, Envelope, Payload, new_command
from keel.domain.events import CommandRejected
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.effects.progress import SETTLED, EffectState
from keel.effects.status import EffectRecord
from keel.errors import InfraError, KeelError
from keel.gateway.settings import IngressSettings
from keel.kafka.clients import loader_config
from keel.kafka.errors import topic_partitions
from keel.kafka.reader import read_to_end, watermarks
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.sdk.producer import CommandProducer

CANCELLED_BY_OPERATOR = "cancelled_by_operator"
RETRYABLE = frozenset({EffectState.FAILED, EffectState.CANCELLED})
_KAFKA_TIMEOUT_S = 10.0

Tenant = Annotated[str, typer.Option(help="The tenant whose effects these are.")]
Reason = Annotated[str, typer.Option(help="Why; recorded in the event and the tenant's audit chain.")]
As = Annotated[str, typer.Option("--as", help="Acting principal as kind:id, e.g. human:olga.ops.")]
Wait = Annotated[bool, typer.Option("--wait", help="Wait for the processor's answer and print it.")]
WaitFor = Annotated[float, typer.Option("--wait-timeout", help="Seconds --wait waits.")]
EffectId = Annotated[uuid.UUID, typer.Argument(help="The effect's id (the id of the event it carries out).")]


class UnknownEffect(KeelError):
    """The status store knows no such effect in the tenant (or its event is not in the events topic)."""

    code = "unknown_effect"


class EffectRefused(KeelError):
    """The operator's command cannot apply to the effect as the store last saw it, or the processor refused it."""

    code = "effect_refused"


def register(group: typer.Typer) -> None:
    """Add the operator commands to the ``effects`` group."""
    group.command("list")(effects_list)
    group.command("show")(effects_show)
    group.command("retry")(effects_retry)
    group.command("cancel")(effects_cancel)


_COLUMNS = (("effect_id", "effect id"), ("state", "state"), ("reason", "reason"), ("event_type", "event"),
            ("provider", "provider"), ("aggregate_id", "aggregate"), ("generation", "gen"), ("attempts", "attempts"),
            ("origin_command_id", "command"), ("updated", "updated"), ("detail", "detail"))


def effects_list(tenant: Tenant, state: Annotated[EffectState | None, typer.Option(
        help="Only effects in this state.")] = None, as_json: AsJson = False) -> None:
    """List a tenant's effects, most recently changed first."""
    found = _store(Settings()).effects(tenant, state)
    records = [{**effect.model_dump(mode="json"), "updated": _when(effect.updated_at)} for effect in found]
    which = f"{state} effects" if state else "effects"
    output.emit(records, as_json=as_json, shown=output.table(_COLUMNS, records, title=f"{which} of {tenant}"),
                empty=f"tenant {tenant} has no {which} in the status store")


def effects_show(effect_id: EffectId, tenant: Tenant, as_json: AsJson = False) -> None:
    """Show one effect: its event, state, attempts, outcome and where its event is."""
    found = _find(_store(Settings()), tenant, effect_id)
    if as_json:
        output.write_json(found.model_dump(mode="json"))
        return
    record = {**found.model_dump(mode="json"), "updated_at": _when(found.updated_at),
              "next_attempt_at": _when(found.next_attempt_at) if found.next_attempt_at else None}
    rows = [{"field": name, "value": value} for name, value in record.items() if value is not None]
    output.console().print(output.table((("field", "field"), ("value", "value")), rows, title=f"effect {effect_id}"))


def effects_retry(effect_id: EffectId, tenant: Tenant, reason: Reason,
                  acting: As = f"{SYSTEM_ACTOR.kind}:{SYSTEM_ACTOR.id}", wait: Wait = False,
                  wait_timeout: WaitFor = 60.0) -> None:
    """Run a failed or cancelled effect again, as its next generation, under the same idempotency key."""
    settings = Settings()
    found = _find(_store(settings), tenant, effect_id)
    if found.state not in RETRYABLE:
        code = "effect_settled" if found.state in SETTLED else "effect_open"
        raise EffectRefused(f"{_as_seen(found)}; only a failed or cancelled effect is retried (the processor "
                            "decides for real, on what it recorded)", code=code)
    if found.event_partition is not None and found.event_offset is not None:
        partition, offset = found.event_partition, found.event_offset
    else:
        partition, offset = _locate(settings, found)
    payload = RetryEffect(effect_id=effect_id, reason=reason, event_partition=partition, event_offset=offset)
    _send(settings, payload, found, acting, wait, wait_timeout)


def effects_cancel(effect_id: EffectId, tenant: Tenant, reason: Reason,
                   acting: As = f"{SYSTEM_ACTOR.kind}:{SYSTEM_ACTOR.id}", wait: Wait = False,
                   wait_timeout: WaitFor = 60.0) -> None:
    """Stop an effect that has no outcome yet: it will not run (code cancelled_by_operator)."""
    settings = Settings()
    found = _find(_store(settings), tenant, effect_id)
    if found.state in SETTLED:
        raise EffectRefused(f"{_as_seen(found)}; a settled effect cannot be cancelled (the processor decides "
                            "for real, on what it recorded)", code="effect_settled")
    _send(settings, CancelEffect(effect_id=effect_id, code=CANCELLED_BY_OPERATOR, reason=reason), found, acting,
          wait, wait_timeout)


def _store(settings: Settings) -> OutboxStore:
    store = OutboxStore(open_database(IngressSettings().dsn(settings)))
    store.migrate()
    return store


def _find(store: OutboxStore, tenant: str, effect_id: uuid.UUID) -> EffectRecord:
    found = store.effect(tenant, effect_id)
    if found is None:
        raise UnknownEffect(f"tenant {tenant} has no effect {effect_id} in the status store "
                            "(`keel effects list --tenant` lists them)")
    return found


def _as_seen(found: EffectRecord) -> str:
    why = f" ({found.reason})" if found.reason else ""
    return f"effect {found.effect_id} is {found.state}{why} as the status store saw it at {_when(found.updated_at)}"


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def _locate(settings: Settings, found: EffectRecord) -> tuple[int, int]:
    """Where the effect's event is, read from the events topic when the store does not say."""
    key, codec = f"{found.tenant_id}/{found.aggregate_id}".encode(), EnvelopeCodec()
    for message in read_to_end(settings, topic_name(settings, Topic.EVENTS)):
        partition, offset = message.partition(), message.offset()
        if message.key() == key and partition is not None and offset is not None \
                and codec.decode(message.value() or b"").id == found.effect_id:
            return partition, offset
    raise UnknownEffect(f"the event of effect {found.effect_id} is not in the events topic", code="event_not_found")


def _send(settings: Settings, payload: Payload, found: EffectRecord, acting: str, wait: bool,
          wait_timeout: float) -> None:
    command = new_command(payload, tenant_id=found.tenant_id, aggregate_id=found.aggregate_id,
                          actor=acting_actor(acting), authority=Authority())
    starts = _ends(settings) if wait else {}
    with CommandProducer(settings) as producer:
        producer.send(command)
    output.say(f"sent {command.type} {command.id} for effect {found.effect_id} to "
               f"{found.tenant_id}/{found.aggregate_id}: {payload.model_dump_json()}")
    if not wait:
        return
    answer = _answer(settings, command, starts, wait_timeout)
    if isinstance(answer.payload, CommandRejected):
        raise EffectRefused(f"the processor refused {command.type} {command.id}: {answer.payload.reason}",
                            code=answer.payload.code)
    output.say(f"recorded {answer.type}: {answer.payload.model_dump_json()}")


def _ends(settings: Settings) -> dict[int, int]:
    """The end of each events partition now: the processor's answer comes after it."""
    topic = topic_name(settings, Topic.EVENTS)
    config = loader_config(settings, f"{settings.topic_prefix}.effects-cli.{uuid.uuid4().hex}")
    consumer = Consumer(config)
    try:
        return {partition: watermarks(consumer, TopicPartition(topic, partition), _KAFKA_TIMEOUT_S)[1]
                for partition in topic_partitions(consumer, config, topic, _KAFKA_TIMEOUT_S)}
    finally:
        consumer.close()


def _answer(settings: Settings, command: Envelope, starts: dict[int, int], timeout_s: float) -> Envelope:
    """The event the processor recorded for ``command``: its outcome or its rejection."""
    topic, codec, deadline = topic_name(settings, Topic.EVENTS), EnvelopeCodec(), time.monotonic() + timeout_s
    while True:
        for message in read_to_end(settings, topic, starts=starts):
            event = codec.decode(message.value() or b"")
            if event.causation_id == command.id:
                return event
        if time.monotonic() > deadline:
            raise InfraError(f"the processor recorded nothing for {command.type} {command.id} within "
                             f"{timeout_s:g} s; is `keel process` running?", code="no_answer")
        time.sleep(0.5)
