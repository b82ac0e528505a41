"""The breaker watcher: trips an agent's circuit breaker when its rejected share is too high.

Two faust agents, because one agent's decisions are spread over every partition of
``<prefix>.events`` (keyed ``tenant/aggregate``) while its counts must add up in one place:

1. ``breaker-signals`` reads the events as raw bytes and forwards each decision of an
   agent, and each ``BreakerTripped`` / ``BreakerReset``, as a small JSON signal to the
   internal topic ``<app id>-signals``, keyed ``tenant/agent`` and stamped with the
   event's own Kafka timestamp. The sends are attached to the source event, so faust
   publishes them before it commits that event's offset (at least once).
2. ``breaker-decide`` reads the signals. Each key lives on one signals partition, which is
   also the changelog partition of both tables, so recovery after a restart is exact with
   any number of workers. ``windows`` is a tumbling windowed table (by signal timestamp)
   of decisions and rejections; ``breakers`` holds whether the breaker is open and the
   last reset. The rules (``keel.watchers.breaker_rules``) decide when to send
   ``TripBreaker``; the window records the send only after the broker acknowledged it.

The command id is derived from tenant, agent, window start and the last reset, so a
redelivery or restart re-sends the same id and the processor's dedupe drops it. The
watcher never writes events: the processor applies the command and writes
``BreakerTripped``, which this watcher then reads back.
"""

from __future__ import annotations

import time
from datetime import timedelta

import faust

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.kafka.topics import Topic, topic_name
from keel.watchers.breaker_rules import (
    BreakerSettings,
    BreakerState,
    Signal,
    SignalKind,
    WindowCounts,
    should_trip,
    signal_of,
    trip_command,
    window_start,
)
from keel.watchers.common import CHANGELOG_CONFIG, decode, log_event, new_app, send_command

COMMIT_INTERVAL_S = 1.0  # attached signals are published at commit: keep the delay short


def app_id(settings: Settings) -> str:
    """The faust app id (consumer group, and prefix of its internal topics)."""
    return f"{settings.topic_prefix}.breaker-watcher"


def signals_topic(settings: Settings) -> str:
    """The internal topic of agent signals, keyed ``tenant/agent``."""
    return f"{app_id(settings)}-signals"


def build_app(settings: Settings, rules: BreakerSettings | None = None) -> faust.App:
    """The breaker watcher app for ``settings``: two agents, a windowed and a plain table."""
    rules = rules or BreakerSettings()
    app = new_app(settings, app_id(settings), broker_commit_interval=COMMIT_INTERVAL_S)
    events = app.topic(topic_name(settings, Topic.EVENTS), key_serializer="raw", value_serializer="raw")
    signals = app.topic(signals_topic(settings), internal=True, partitions=settings.topic_partitions,
                        key_serializer="raw", value_serializer="json")
    commands = app.topic(topic_name(settings, Topic.COMMANDS), key_serializer="raw",
                         value_serializer="raw")

    async def recovered() -> None:
        """Say when the tables are back from their changelogs (tests and operators wait on it)."""
        log_event("breaker_tables_recovered", app=app.conf.id)

    expires = timedelta(seconds=max(3 * rules.window_s, rules.window_s + rules.stale_after_s))
    windows = app.Table(
        "windows",
        default=dict,
        help="Decisions and rejections per tenant/agent and window, with the offsets counted.",
        partitions=settings.topic_partitions,
        extra_topic_configs=CHANGELOG_CONFIG,
        on_recover=recovered,
    ).tumbling(timedelta(seconds=rules.window_s), expires=expires).relative_to_stream()
    breakers = app.Table(
        "breakers",
        default=dict,
        help="Per tenant/agent: whether the breaker is open, and the id of the last reset.",
        partitions=settings.topic_partitions,
        extra_topic_configs=CHANGELOG_CONFIG,
    )
    codec = EnvelopeCodec()

    @app.agent(events, name="breaker-signals")
    async def extract(stream: faust.StreamT[bytes]) -> None:
        """Forward what each event signals to the agent's signals partition."""
        async for event in stream.events():
            message = event.message
            envelope = decode(codec, event.value, message)
            signal = None if envelope is None else signal_of(envelope, message.partition,
                                                             message.offset)
            if signal is not None:
                await signals.send(key=signal.key.encode(), value=signal.to_json(),
                                   timestamp=message.timestamp)

    @app.agent(signals, name="breaker-decide")
    async def decide(stream: faust.StreamT[dict[str, object]]) -> None:
        """Keep breaker state and window counts; trip when a window crosses the threshold."""
        async for event in stream.events():
            signal = Signal.from_json(event.value)
            key = signal.key
            breaker = BreakerState.from_json(breakers[key])
            if signal.kind in (SignalKind.TRIPPED, SignalKind.RESET):
                updated = breaker.apply(signal)
                if updated != breaker:
                    breakers[key] = updated.to_json()
                    log_event("breaker_" + signal.kind.value, tenant=signal.tenant,
                              agent=signal.agent, event_id=signal.event_id)
                continue
            current = WindowCounts.from_json(windows[key].current())
            counts = current.add(signal, breaker.epoch)
            if counts is None:  # counted before a restart, re-delivered now
                counts = current
            else:
                windows[key] = counts.to_json()
            start = window_start(event.message.timestamp, rules.window_s)
            if should_trip(counts, breaker, rules, start=start, now=time.time()):
                await send_command(commands, codec,
                                   trip_command(signal.tenant, signal.agent, counts, rules, start=start))
                windows[key] = counts.mark_sent().to_json()

    return app
