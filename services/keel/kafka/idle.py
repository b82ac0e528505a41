"""Telling a worker that waits for work from one that was left without it.

An idle loop is healthy only while there is nothing for it to do. Two ways it can look
idle and not be: its partitions hold records that polling never returns, or its consumer
was left out of the group (after a broker restart, librdkafka can stop rejoining) while
another member holds several partitions. Either keeps the worker in a watched step, so
that its watchdog restarts it after the stall bound. Each check asks the broker, so it
runs at most every few seconds.
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient

from keel.supervision.progress import IDLE, Progress

RECORDS_WAITING = "records waiting, none consumed"
LEFT_OUT = "no partitions while another member holds several"
CHECK_EVERY_S = 5.0


class IdleCheck:
    """Keeps ``progress`` in a watched step while an idle worker is not really idle.

    ``records`` only for input topics that no transaction writes: there an open
    transaction holds records back from a ``read_committed`` consumer, legitimately,
    until it ends.
    """

    def __init__(self, consumer: Consumer, admin: AdminClient, group_id: str, *, records: bool = True,
                 every_s: float = CHECK_EVERY_S) -> None:
        self._consumer, self._admin, self._group_id = consumer, admin, group_id
        self._records, self._every_s = records, every_s
        self._next = 0.0

    def check(self, progress: Progress) -> None:
        """When a check is due, put ``progress`` in the step it shows (keeping a watched step's clock)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._every_s
        try:
            if self._consumer.assignment():
                step = RECORDS_WAITING if self._records and records_waiting(self._consumer) else IDLE
            else:
                step = LEFT_OUT if left_out(self._consumer, self._admin, self._group_id) else IDLE
        except KafkaException:  # the broker is away: nothing to judge by, and no call hangs
            step = IDLE
        progress.stay(step)


def records_waiting(consumer: Consumer) -> bool:
    """Whether any assigned partition has records past the consumer's position (or committed offset)."""
    assignment = consumer.assignment()
    at = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(assignment, timeout=10)}
    for tp in consumer.position(assignment):
        at[tp.topic, tp.partition] = max(at.get((tp.topic, tp.partition), -1), tp.offset)
    for tp in assignment:
        low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
        if max(at.get((tp.topic, tp.partition), -1), low) < high:
            return True
    return False


def left_out(consumer: Consumer, admin: AdminClient, group_id: str) -> bool:
    """Whether ``consumer`` is missing from its group, or holds nothing while a member holds two or more.

    A group the broker cannot describe in time (it is restarting) counts as not left out: the
    next check asks again, and the watchdog still bounds a step that makes no progress.
    """
    try:
        described = admin.describe_consumer_groups([group_id], request_timeout=10)[group_id].result(timeout=15)
    except TimeoutError:
        return False
    held = {m.member_id: len(m.assignment.topic_partitions) for m in described.members}
    return consumer.memberid() not in held or max(held.values(), default=0) > 1
