"""What every faust watcher shares: the app's base settings, decoding, logging, sending commands.

Each watcher is one ``faust.App`` built by a function in its own module; this module holds
the choices they all make, each learnt once:

- aiokafka needs cramjam to read the lz4 batches Keel's producers write (checked up front).
- ``broker_session_timeout`` is 10 s: with faust's 60 s a killed worker keeps its
  partitions, and nothing is processed, for a minute.
- Tables live in memory and come back from their changelog; no standby replicas (a
  memory store gains nothing from them, and a standby's keys would mix into the active ones).
- Its internal topics (table changelogs, repartition topics) are created with the admin
  API before the worker starts, and waited for until the broker's metadata lists them.
  Left to faust, they are created at start-up and the first table write can race the
  metadata: the agent crashes with ``PartitionsMismatch`` ("the changelog topic has 0
  partitions"), seen under load right after other topics were deleted.
- Undecodable bytes are logged as one JSON line and skipped, never raised.
- A watcher acts only by sending a command, encoded like any producer's, keyed
  ``tenant/aggregate`` (= ``envelope.key``; aiokafka partitions with murmur2 like the
  Java client and librdkafka's ``murmur2_random``, so the processor sees it on the same
  partition as every other command of that aggregate).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any

import faust
from aiokafka.codec import has_lz4  # type: ignore[import-untyped]
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from faust.types import Message, TopicT

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.errors import ConfigError, InfraError, KeelError
from keel.kafka.clients import admin_config
from keel.observability.metrics import WATCHER_COMMANDS, WATCHER_EVENTS

log = logging.getLogger(__name__)

SESSION_TIMEOUT_S = 10.0  # faust's 60 s default keeps a killed worker's partitions that long
# Compaction only touches closed segments: roll them often so the changelog that
# recovery (and readers such as ``keel stats``) read stays close to one record per key.
CHANGELOG_CONFIG = {"segment.ms": str(10 * 60 * 1000), "min.cleanable.dirty.ratio": "0.1"}


_events_read: Any = None
"""Events read by this process's watcher (one watcher app per process; ``new_app`` names it)."""


def new_app(settings: Settings, app_id: str, **overrides: Any) -> faust.App:
    """A faust app with Keel's watcher defaults, reading from the earliest offset."""
    if not has_lz4():  # Keel's producers compress with lz4; aiokafka needs cramjam for it
        raise ConfigError("aiokafka cannot read lz4 batches: install aiokafka[lz4] (cramjam)",
                          code="lz4_missing")
    global _events_read
    _events_read = WATCHER_EVENTS.labels(app_id.removeprefix(f"{settings.topic_prefix}."))
    datadir = settings.data_dir / "watchers"  # faust's default is the working directory
    datadir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    options: dict[str, Any] = {
        "broker": [f"kafka://{server.strip()}" for server in settings.bootstrap_servers.split(",")],
        "store": "memory://",
        "autodiscover": False,
        "web_enabled": False,
        "topic_partitions": settings.topic_partitions,
        "topic_replication_factor": settings.replication_factor,
        "broker_session_timeout": SESSION_TIMEOUT_S,
        "consumer_auto_offset_reset": "earliest",
        "table_standby_replicas": 0,
        "datadir": str(datadir / f"{app_id}-data"),
        **overrides,
    }
    return faust.App(app_id, **options)


def log_event(event: str, **fields: Any) -> None:
    """One JSON line at INFO: ``{"event": ..., **fields}`` (tests and operators grep these)."""
    log.info(json.dumps({"event": event, **fields}, default=str))


def decode(codec: EnvelopeCodec, data: Any, message: Message) -> Envelope | None:
    """The envelope in a raw message, or ``None`` (logged) when it is not a Keel message."""
    if _events_read is not None:
        _events_read.inc()
    try:
        return codec.decode(bytes(data or b""))
    except KeelError as err:
        log.warning(json.dumps({
            "event": "undecodable", "topic": message.topic, "partition": message.partition,
            "offset": message.offset, "code": err.code, "reason": err.message,
        }))
        return None


async def send_command(topic: TopicT, codec: EnvelopeCodec, command: Envelope) -> None:
    """Send ``command`` now (not attached to the current event) and wait for the broker's ack.

    Watchers record that a command was sent only after this returns, so a crash between
    the two re-sends the same command id, which the processor drops as a duplicate.
    """
    pending = await topic.send(key=command.key.encode(), value=codec.encode(command), force=True)
    await pending
    WATCHER_COMMANDS.labels(command.actor.id, command.type).inc()
    log_event("command_sent", tenant=command.tenant_id, aggregate=command.aggregate_id,
              type=command.type, command_id=str(command.id))


def internal_topics(app: faust.App) -> list[TopicT]:
    """The topics ``app`` owns: its tables' changelogs and the internal topics its agents read."""
    topics: list[TopicT] = [table.changelog_topic for table in app.tables.values()]
    for agent in app.agents.values():
        channel = agent.channel
        if isinstance(channel, faust.Topic) and channel.internal:
            topics.append(channel)
    return topics


def declare_internal_topics(settings: Settings, app: faust.App, *, timeout_s: float = 30.0) -> None:
    """Create ``app``'s internal topics as faust would, and wait until the metadata lists them."""
    admin = AdminClient(admin_config(settings))
    wanted = {name: _new_topic(settings, app, topic, name)
              for topic in internal_topics(app) for name in topic.topics}
    existing = admin.list_topics(timeout=timeout_s).topics
    missing = [spec for name, spec in wanted.items() if name not in existing]
    if missing:
        for name, future in admin.create_topics(missing, operation_timeout=timeout_s).items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # another worker won the race
                    raise InfraError(f"could not create topic {name}: {exc}",
                                     code="topic_create_failed") from exc
    deadline = time.monotonic() + timeout_s
    while True:
        listed = admin.list_topics(timeout=timeout_s).topics
        if all(name in listed and listed[name].partitions for name in wanted):
            return
        if time.monotonic() > deadline:
            raise InfraError(f"topics {sorted(set(wanted) - set(listed))} did not appear within "
                             f"{timeout_s:.0f}s", code="topic_create_failed")
        time.sleep(0.2)


def _new_topic(settings: Settings, app: faust.App, topic: TopicT, name: str) -> NewTopic:
    """``topic`` as faust's aiokafka driver would create it (cleanup policy, retention, config)."""
    config: dict[str, str] = {}
    policy = ",".join(flag for flag, on in (("compact", topic.compacting), ("delete", topic.deleting))
                      if on)
    if policy:
        config["cleanup.policy"] = policy
    if topic.retention:
        retention = topic.retention
        seconds = retention.total_seconds() if isinstance(retention, timedelta) else float(retention)
        config["retention.ms"] = str(int(seconds * 1000))
    config.update({key: str(value) for key, value in (topic.config or {}).items()})
    return NewTopic(name, topic.partitions or app.conf.topic_partitions,
                    topic.replicas or app.conf.topic_replication_factor or settings.replication_factor,
                    config=config)
