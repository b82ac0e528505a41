"""librdkafka configurations for each role, built from settings in one place.

Producers partition with murmur2 (the Java client's partitioner), so any client in any
language maps ``tenant/aggregate`` keys to the same partition. Every client authenticates
as the configured SASL principal when one is set (``keel up --secure``).
"""

from __future__ import annotations

import logging

from typing import Any

from keel.config import Settings

PARTITIONER = "murmur2_random"


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """An idempotent, ``acks=all`` producer: no duplicates, no reordering on retry."""
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        **settings.kafka_auth(),
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": PARTITIONER,
        "linger.ms": 5,
        "compression.type": "lz4",
        **overrides,
    }


def transactional_producer_config(settings: Settings, transactional_id: str) -> dict[str, Any]:
    """A producer that writes outputs and consumer offsets in one Kafka transaction.

    A transaction begun right after a commit can reach the coordinator while it still
    writes the previous one's markers (a few ms); it answers CONCURRENT_TRANSACTIONS and
    the request is retried after ``retry.backoff.ms``: 1 ms, not the 100 ms default that
    stalled back-to-back transactions (the backoff still grows if the refusals persist;
    p99 at 1,000 commands/s was 58–65 ms with 1 ms against 65–88 ms with 5 ms).
    The plain producer's 5 ms linger stays: the commit sends what waits at once, so it holds
    back only records produced while the batch is still being decided, and gathers them into
    fewer, larger produce requests. Without it (linger 0) every few records went out in a
    request of their own: the processor's librdkafka thread spent ~11 µs a command
    on them and the broker ~11 µs, against ~4 and ~7 with it (``kafka_baseline.py``,
    2026-12-06), while p99 at 1,000 commands/s stayed within the noise (36–44 ms against
    38–39 ms in alternating runs of ``processor.py``). A longer linger (50 ms) showed in that
    p99 (58–93 ms): the commit then waits for records that could have been sent already.
    """
    return producer_config(settings, **{"transactional.id": transactional_id,
                                        "transaction.timeout.ms": settings.kafka_transaction_timeout_ms,
                                        "retry.backoff.ms": 1})


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """A ``read_committed`` consumer with manual offset handling."""
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        **settings.kafka_auth(),
        "group.id": group_id,
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        **overrides,
    }


BATCHED_FETCH: dict[str, Any] = {"fetch.min.bytes": 262_144, "fetch.wait.max.ms": 100}
"""Consumer overrides for a reader that writes in batches anyway (the projector, the audit
chainer, the status tracker): the broker answers a fetch once 256 KiB are there or 100 ms
have passed, not as soon as one record is. Under load each of them otherwise fetched a few
records at a time: in a pair of ``end_to_end.py`` runs at 5,000 offered (2026-12-06) the
broker's CPU per command went 108 → 67 µs and the projector's 132 → 97 µs with these. The price is at most
100 ms more before a record is read; the processor, whose latency is a target, keeps the
defaults."""


def admin_config(settings: Settings) -> dict[str, Any]:
    """The admin client's configuration."""
    return {"bootstrap.servers": settings.bootstrap_servers, **settings.kafka_auth()}


def loader_config(settings: Settings, group_id: str) -> dict[str, Any]:
    """A consumer that reads partitions to their end once: short fetch waits, EOF events.

    The default fetch wait (500 ms) is a long poll for new data; a loader wants to learn
    quickly that there is none.
    """
    return consumer_config(settings, group_id, **{"enable.partition.eof": True, "fetch.wait.max.ms": 10})


def follower_config(settings: Settings, group_id: str) -> dict[str, Any]:
    """A consumer that follows partitions already read to their end (by a loader).

    A fetch returns as soon as committed data arrives, whatever its wait, so following
    needs no short one. Each fetch that comes back empty costs the broker 0.25–0.5 ms of
    CPU (``benchmarks/README.md``, 2026-12-07, afternoon): at the loader's 10 ms that was
    a hundred a second per worker, forever (~13 % of a broker core), at 100 ms still ten.
    """
    return consumer_config(settings, group_id, **{"fetch.wait.max.ms": 1000,
                                                  "logger": outage_quiet_logger("keel.kafka.follower")})


class _WithoutRefusals(logging.Filter):
    """Drops librdkafka's line per refused or dropped broker connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Connection refused" in message or "Disconnected" in message or "brokers are down" in message)


def outage_quiet_logger(name: str) -> logging.Logger:
    """The logger ``name`` for a client's librdkafka lines, without its line per refused or dropped connection:
    several a second through an outage, which the service reports once itself (its log, ``/readyz``)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _WithoutRefusals) for f in logger.filters):
        logger.addFilter(_WithoutRefusals())
    return logger
