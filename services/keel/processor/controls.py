"""Keeps a worker's view of the compacted controls topic current.

On start it reads the topic to its end (so no command is decided under stale switches),
then a background thread follows it. The processor also applies the control records of
its own committed transactions at once, so a switch it throws holds for its very next
batch; other workers see it within one poll.
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from keel.config import Settings
from keel.domain.governance.controls import Controls
from keel.errors import InfraError, KeelError
from keel.kafka.clients import follower_config, loader_config
from keel.kafka.topics import Topic, topic_name

log = logging.getLogger(__name__)


class ControlsFollower:
    """Folds the controls topic into ``controls`` until stopped."""

    def __init__(self, settings: Settings, controls: Controls) -> None:
        self.controls = controls
        self._settings = settings
        self._topic = topic_name(settings, Topic.CONTROLS)
        self._consumer = Consumer(follower_config(settings, f"{settings.topic_prefix}.controls-follower"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="controls-follower", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        """Read the topic to its end, then follow it in the background from there.

        The end is read with a loader (short fetch waits, end-of-partition events), the rest
        by a consumer that waits long: a fetch returns as soon as a record arrives anyway.
        Raises ``InfraError`` when the end is not reached within ``timeout_s`` (a broker
        that went away): no command may be decided under switches only half read.
        """
        loader = Consumer(loader_config(self._settings, f"{self._settings.topic_prefix}.controls-loader"))
        try:
            partitions = loader.list_topics(self._topic, timeout=timeout_s).topics[self._topic].partitions
            loader.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
            pending = set(partitions)
            positions: dict[int, int] = {}  # the next offset to read, past what was applied or seen to end
            deadline = time.monotonic() + timeout_s
            while pending:
                if time.monotonic() > deadline:
                    raise InfraError(f"the controls topic {self._topic} was not read to its end within "
                                     f"{timeout_s:.0f}s (partitions {sorted(pending)} pending)", code="controls_unread")
                for message in loader.consume(1000, timeout=0.2):
                    error, partition, offset = message.error(), message.partition(), message.offset()
                    if error is not None and error.code() == KafkaError._PARTITION_EOF:
                        assert partition is not None and offset is not None  # an end has a position
                        pending.discard(partition)
                        positions[partition] = max(positions.get(partition, 0), offset)
                        continue
                    self._apply(message)  # a record, or an error it logs
                    if error is None and partition is not None and offset is not None:
                        positions[partition] = offset + 1
            self._consumer.assign([TopicPartition(self._topic, p, positions.get(p, OFFSET_BEGINNING))
                                   for p in partitions])
        finally:
            loader.close()
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(1000, timeout=0.2):
                self._apply(message)

    def _apply(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.error("controls topic error: %s", error)
            return
        key = (message.key() or b"").decode()
        try:
            self.controls.apply(key, message.value())
        except KeelError as exc:  # a bad record must not freeze every tenant's controls
            log.error("ignoring unusable controls record %s: %s", key, exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._consumer.close()
