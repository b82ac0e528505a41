"""A domain's commands through the real path: the producer SDK, Kafka, a processor worker, Kafka.

Where ``keel.testing.scenario`` runs a domain's ``decide`` alone, a ``Pipeline`` shows what
production does with a command: governance (roles, the domain's default policy rules,
approvals, rate limits), personal fields sealed on the wire, and one Kafka transaction per
batch. It needs a broker (``keel up``) and the topics of ``settings``; ``run`` sends the
commands, lets its worker decide everything on the topic, and reads back each command's
events by their deterministic ids, personal fields opened.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from keel.bootstrap import edge_codec
from keel.config import Settings
from keel.domain.envelope import Envelope, new_command
from keel.domain.outcomes import event_id
from keel.domain.payloads import Command
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.processor.worker import CommandProcessor
from keel.sdk.producer import CommandProducer
from keel.testing.scenario import ACTOR, TENANT, Decided, parse_actor


class Pipeline:
    """A processor worker on ``settings``' topics, the envelopes to send it, and what it decided."""

    def __init__(self, settings: Settings, *, tenant: str = TENANT, actor: str = ACTOR,
                 timeout_s: float = 60.0) -> None:
        self.settings = settings
        self.tenant = tenant
        self.actor = actor
        self.timeout_s = timeout_s
        self._codec, self._release_codec = edge_codec(settings)
        try:
            self._processor = CommandProcessor(settings, instance_id=f"testing-{uuid.uuid4().hex[:8]}",
                                               codec=self._codec)
        except BaseException:
            self._release_codec()
            raise

    def command(self, payload: Command, *, aggregate: str, actor: str | None = None,
                on_behalf_of: str | None = None, expected_version: int | None = None) -> Envelope:
        """A new command envelope of the pipeline's tenant, from ``actor`` (``kind:id``, default the pipeline's)."""
        return new_command(payload, tenant_id=self.tenant, aggregate_id=aggregate,
                           actor=parse_actor(actor or self.actor), on_behalf_of=on_behalf_of,
                           expected_version=expected_version)

    def run(self, *commands: Envelope) -> list[Decided]:
        """Send ``commands``, decide every command on the topic, and return what each one yielded, in order.

        A command's events are those its decision wrote (ids ``event_id(command.id, i)``): a
        parked command yields ``ApprovalRequested`` (its effects belong to the approving
        command), a dead-lettered one nothing.
        """
        with CommandProducer(self.settings, codec=self._codec) as producer:
            for command in commands:
                producer.send(command)
        self._processor.run_until_caught_up(self.timeout_s)
        topic = topic_name(self.settings, Topic.EVENTS)
        decoded = (self._codec.decode(m.value() or b"") for m in read_to_end(self.settings, topic))
        by_id = {event.id: event for event in decoded}
        return [Decided(command, tuple(_decided_by(command, by_id))) for command in commands]

    def close(self) -> None:
        """Leave the processor group and release the key store."""
        try:
            self._processor.close()
        finally:
            self._release_codec()


def _decided_by(command: Envelope, events: dict[uuid.UUID, Envelope]) -> Iterator[Envelope]:
    index = 0
    while (event := events.get(event_id(command.id, index))) is not None:
        yield event
        index += 1


@contextmanager
def processing(settings: Settings, *, tenant: str = TENANT, actor: str = ACTOR,
               timeout_s: float = 60.0) -> Iterator[Pipeline]:
    """A ``Pipeline`` on ``settings``' broker and topics, closed on exit."""
    pipeline = Pipeline(settings, tenant=tenant, actor=actor, timeout_s=timeout_s)
    try:
        yield pipeline
    finally:
        pipeline.close()
