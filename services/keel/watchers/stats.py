"""The stats watcher: per-tenant counts per minute of commands and decisions, in faust.

One agent reads ``<prefix>.commands`` and ``<prefix>.events`` as raw bytes and keeps a
tumbling one-minute windowed table (kept for ``EXPIRES``). Counting rules, table keys and
the duplicate guard live in ``keel.watchers.stats_tally``. Windows follow the Kafka record
timestamp (set by the producer at send time; for events, the processor's decision time):
windowing by the envelope's ``occurred_at`` would mean decoding every message a second
time in faust's timestamp hook. Undecodable bytes are logged and counted, never raised.

The table is in memory and comes back from its changelog topic on restart. ``keel stats``
reads that same changelog (``keel.watchers.stats_reader``) instead of a web view: it works
while the watcher is down or restarting and sums every worker's partitions, whereas each
worker's web view holds only the partitions assigned to it. So the faust web server is off.
The watcher only reads; it never writes events.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import faust
from faust.types import Message

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.kafka.topics import Topic, topic_name
from keel.watchers.common import CHANGELOG_CONFIG, decode, new_app
from keel.watchers.stats_tally import UNKNOWN_TENANT, Counts, Metric, Source, classify, table_key

log = logging.getLogger(__name__)

TABLE = "counts"
WINDOW = timedelta(minutes=1)
EXPIRES = timedelta(hours=3)


def app_id(settings: Settings) -> str:
    """The faust app id (consumer group, and prefix of its internal topics)."""
    return f"{settings.topic_prefix}.stats-watcher"


def changelog_topic(settings: Settings) -> str:
    """The changelog topic of the counts table (faust's ``<app id>-<table>-changelog``)."""
    return f"{app_id(settings)}-{TABLE}-changelog"


def build_app(settings: Settings) -> faust.App:
    """The stats watcher app for ``settings``: one agent, one windowed table."""
    app = new_app(settings, app_id(settings))
    sources = {topic_name(settings, Topic.COMMANDS): Source.COMMANDS,
               topic_name(settings, Topic.EVENTS): Source.EVENTS}
    topic = app.topic(*sources, key_serializer="raw", value_serializer="raw")

    async def recovered() -> None:
        """Say when the table is back from its changelog (tests and operators wait on it)."""
        log.info(json.dumps({"event": "stats_table_recovered", "app": app.conf.id}))

    counts = app.Table(
        TABLE,
        default=dict,
        help="Counts per tenant/source/partition key and minute, with the last offset counted.",
        partitions=settings.topic_partitions,
        extra_topic_configs=CHANGELOG_CONFIG,
        on_recover=recovered,
    ).tumbling(WINDOW, expires=EXPIRES)
    codec = EnvelopeCodec()

    @app.agent(topic, name="stats-count")
    async def count(stream: faust.StreamT[bytes]) -> None:
        """Add each message to its tenant's counts in the window of its timestamp."""
        async for event in stream.events():
            message = event.message
            source = sources[message.topic]
            tenant, metric = _measure(codec, source, event.value, message)
            if metric is None:
                continue
            key = table_key(tenant, source, message.partition)
            updated = Counts.from_json(counts[key].value()).add(metric, message.offset)
            if updated is not None:  # None: counted before a restart, re-delivered now
                counts[key] = updated.to_json()

    return app


def _measure(codec: EnvelopeCodec, source: Source, data: Any,
             message: Message) -> tuple[str, Metric | None]:
    """The tenant and metric of one message; undecodable bytes are logged, not raised."""
    envelope = decode(codec, data, message)
    if envelope is None:
        return UNKNOWN_TENANT, Metric.UNDECODABLE
    return envelope.tenant_id, classify(source, envelope)
