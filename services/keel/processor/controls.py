"""Keeps a worker's view of the compacted controls topic current.

On start it reads the topic to its end (so no command is decided under stale switches),
then a background thread follows it. The processor also applies the control records of
its own committed transactions at once, so a switch it throws holds for its very next
batch; other workers see it within one poll.
"""

from __future__ import annotations

import logging
import threading

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from keel.config import Settings
from keel.domain.governance.controls import Controls
from keel.errors import KeelError
from keel.kafka.clients import follower_config
from keel.kafka.reader import read_to_end
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
        """Read the topic to its end (``read_to_end``: short fetch waits), then follow it from there
        in the background, with long ones: a fetch returns as soon as a record is committed anyway.

        Raises ``InfraError`` when the end is not reached (no progress for ``timeout_s``: a broker
        that went away): no command may be decided under switches only half read.
        """
        positions: dict[int, int] = {}
        for message in read_to_end(self._settings, self._topic, timeout_s):
            self._apply(message)
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None  # a record always has a position
            positions[partition] = offset + 1
        partitions = self._consumer.list_topics(self._topic, timeout=timeout_s).topics[self._topic].partitions
        self._consumer.assign([TopicPartition(self._topic, p, positions.get(p, OFFSET_BEGINNING))
                               for p in partitions])
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(1000, timeout=0.2):
                self._apply(message)

    def _apply(self, message: Message) -> None:
        error = message.error()
        if error is not None:  # the follower asks for no end-of-partition events: every one is worth a line
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
