"""``watermarks`` waits out a partition leader that is not ready, and nothing else."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from keel.kafka.reader import watermarks


class Broker:
    """Stands in for a consumer: answers each watermark request with the next scripted reply."""

    def __init__(self, *replies: tuple[int, int] | int) -> None:
        self.replies = list(replies)
        self.asked = 0

    def get_watermark_offsets(self, _partition: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        self.asked += 1
        reply = self.replies.pop(0)
        if isinstance(reply, int):
            raise KafkaException(KafkaError(reply))
        return reply


def test_a_leader_not_ready_yet_is_waited_for() -> None:
    broker = Broker(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, (0, 42))

    assert watermarks(broker, TopicPartition("t", 0), timeout_s=5) == (0, 42)  # type: ignore[arg-type]
    assert broker.asked == 3


def test_other_errors_and_a_leader_that_never_comes_raise() -> None:
    with pytest.raises(KafkaException):
        watermarks(Broker(KafkaError._TRANSPORT), TopicPartition("t", 0), timeout_s=5)  # type: ignore[arg-type]
    never = Broker(*[KafkaError.NOT_LEADER_FOR_PARTITION] * 100)
    with pytest.raises(KafkaException):
        watermarks(never, TopicPartition("t", 0), timeout_s=0.3)  # type: ignore[arg-type]
    assert 2 <= never.asked < 100
