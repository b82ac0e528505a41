"""The mechanics every consume-transform-produce loop on Kafka transactions shares.

Used by the command processor and the audit chainer: commit with retries, abort and
rewind to the committed offsets (so the batch is processed again), the offsets to send
with a batch, and "has this consumer caught up with the topic as it was". Each
transactional call names its step in the worker's ``Progress`` first, so its watchdog
can tell which call hangs.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from keel.errors import InfraError
from keel.supervision.progress import IDLE, Progress

log = logging.getLogger(__name__)
TIMEOUT_S = 30.0
"""Bound of each transactional call (librdkafka may overrun it: librdkafka#5456, #5511)."""


def commit(producer: Producer, progress: Progress) -> None:
    """Commit the open transaction, retrying what librdkafka calls retriable for up to ``TIMEOUT_S``.

    Past that the error is raised: the caller aborts, or builds a fresh worker, rather
    than retrying for as long as the broker stays away.
    """
    progress.enter("commit_transaction")
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            producer.commit_transaction(TIMEOUT_S)
            return
        except KafkaException as exc:
            if not exc.args[0].retriable() or time.monotonic() >= deadline:
                raise


def send_offsets(producer: Producer, consumer: Consumer, messages: list[Message], progress: Progress) -> None:
    """Add the offsets after ``messages`` to the open transaction, retrying what librdkafka calls retriable.

    A broker that dies while it coordinates the group or the transaction answers with a
    transport failure until the cluster has moved the role elsewhere (seconds): retried
    for up to ``TIMEOUT_S``, that costs the batch those seconds, where giving up cost the
    worker a rebuild, a rebalance and a reload (about 30 s on a 3-broker cluster).
    """
    progress.enter("send_offsets_to_transaction")
    offsets, group = next_offsets(messages), consumer.consumer_group_metadata()
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            producer.send_offsets_to_transaction(offsets, group, TIMEOUT_S)
            return
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if not error.retriable() or error.txn_requires_abort() or time.monotonic() >= deadline:
                raise
            log.warning("retrying send_offsets_to_transaction: %s", error)
            time.sleep(0.1)


def abort_and_rewind(producer: Producer, consumer: Consumer, exc: KafkaException, role: str,
                     progress: Progress) -> None:
    """Abort the open transaction and seek back, or raise when only a new producer can go on.

    A fatal error (the producer was fenced, as after a broker outage longer than the
    transaction timeout) or one that no abort clears raises ``InfraError``; so does a
    failed abort, as a ``KafkaException``. Either way the worker is rebuilt
    (``keel.supervision.resilient``).
    """
    error: KafkaError = exc.args[0]
    if error.fatal() or not error.txn_requires_abort():
        raise InfraError(f"{role} transaction failed and cannot be aborted: {error}",
                         code=f"{role}_transaction_failed") from exc
    log.warning("aborting %s batch: %s", role, error)
    progress.enter("abort_transaction")
    producer.abort_transaction(TIMEOUT_S)
    progress.enter("rewinding")
    for tp in consumer.committed(consumer.assignment(), timeout=TIMEOUT_S):
        tp.offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
        consumer.seek(tp)
    progress.enter(IDLE)


def release(producer: Producer) -> None:
    """Shut a transactional producer down without waiting on the broker.

    What is queued belongs to a transaction that is not committed, so it is dropped: the
    broker aborts that transaction, and the batch is processed again by whoever owns the
    partitions next. ``close()`` alone would first try to abort and flush, which waits up
    to the request timeout when the broker is away. Releasing twice is harmless.
    """
    try:
        producer.purge()
    except RuntimeError:  # confluent-kafka's "Producer has been closed"
        return
    producer.close()


def next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """The offsets to commit with a batch: one past the last record of each partition."""
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        partition, offset = m.partition(), m.offset()
        assert partition is not None and offset is not None, "a consumed message always has a position"
        key = (m.topic() or "", partition)
        last[key] = max(last.get(key, -1), offset)
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]


def end_offsets(consumer: Consumer) -> dict[int, int]:
    """The high watermark of every assigned partition, now."""
    return {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in consumer.assignment()}


def caught_up(consumer: Consumer, targets: dict[int, int]) -> bool:
    """Whether every partition got to its target offset.

    Either mark counts: the position passes transaction markers (which committed offsets
    never reach on a transactional topic), and the committed offset stands in for a
    partition with nothing new to consume (whose position stays unset).
    """
    assignment = consumer.assignment()
    done = {tp.partition: tp.offset for tp in consumer.committed(assignment, timeout=10)}
    for tp in consumer.position(assignment):
        done[tp.partition] = max(done.get(tp.partition, -1), tp.offset)
    return all(high == 0 or done.get(p, -1) >= high for p, high in targets.items())

