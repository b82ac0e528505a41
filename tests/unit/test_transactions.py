"""Adding a batch's offsets to its transaction: a retriable refusal (a coordinator that died) is retried,
one that needs an abort is raised to the loop, which aborts and rewinds."""

from __future__ import annotations

from typing import Any, cast

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from keel.kafka import transactions
from keel.supervision.progress import Progress


class _Message:
    def __init__(self, partition: int, offset: int) -> None:
        self._position = (partition, offset)

    def topic(self) -> str:
        return "commands"

    def partition(self) -> int:
        return self._position[0]

    def offset(self) -> int:
        return self._position[1]


class _Producer:
    """Refuses ``send_offsets_to_transaction`` with each of ``refusals`` in turn, then accepts."""

    def __init__(self, *refusals: KafkaError) -> None:
        self.refusals = list(refusals)
        self.sent: list[list[TopicPartition]] = []

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], _group: object, _timeout: float) -> None:
        self.sent.append(offsets)
        if self.refusals:
            raise KafkaException(self.refusals.pop(0))


class _Consumer:
    def consumer_group_metadata(self) -> object:
        return object()


def _send(producer: _Producer) -> None:
    transactions.send_offsets(cast(Producer, producer), cast(Consumer, _Consumer()),
                              cast(list[Message], [_Message(0, 4), _Message(0, 7), _Message(2, 1)]), Progress())


def test_a_retriable_refusal_is_retried_with_the_same_offsets() -> None:
    away = KafkaError(KafkaError._TRANSPORT, "Broker transport failure", retriable=True)
    producer = _Producer(away, away)
    _send(producer)
    assert len(producer.sent) == 3
    assert all([(tp.partition, tp.offset) for tp in sent] == [(0, 8), (2, 2)] for sent in producer.sent)


@pytest.mark.parametrize("refusal", [
    KafkaError(KafkaError._STATE, "must abort", txn_requires_abort=True),
    KafkaError(KafkaError._FENCED, "fenced", fatal=True),
    KafkaError(KafkaError.INVALID_TXN_STATE, "not retriable"),
])
def test_a_refusal_that_no_retry_clears_is_raised_at_once(refusal: Any) -> None:
    producer = _Producer(refusal)
    with pytest.raises(KafkaException):
        _send(producer)
    assert len(producer.sent) == 1
