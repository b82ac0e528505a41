"""A worker's transactional producer is released at once, even with the broker away."""

from __future__ import annotations

import time

from confluent_kafka import Producer

from keel.kafka import transactions


def test_release_drops_what_is_queued_without_waiting_for_an_absent_broker() -> None:
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0, "message.timeout.ms": 60_000})
    producer.produce("never-delivered", b"value")
    assert len(producer) >= 1  # the message (and whatever librdkafka queued itself) waits
    started = time.monotonic()
    transactions.release(producer)
    assert time.monotonic() - started < 5  # close() alone waits for the queued message to time out
    transactions.release(producer)  # twice is harmless
