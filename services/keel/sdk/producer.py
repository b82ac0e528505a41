"""The producer SDK: sends validated commands to the tenant-partitioned commands topic.

An idempotent ``acks=all`` producer (no loss, no duplicates, no reordering on retry).
Delivery reports are collected and surfaced: ``flush`` raises ``DeliveryError`` naming
every command Kafka did not acknowledge, so a caller never believes a lost send. On a
secure broker a denied ACL raises ``AuthorizationDenied`` and a refused login
``AuthenticationFailed`` (as soon as librdkafka reports it, not after the flush timeout).

Every record carries the producing principal's tenant in the ``keel-principal-tenant``
header; the processor rejects a command whose envelope claims another tenant. A producer
built with a ``Principal`` refuses such a command before it leaves the process.

``send_many`` queues a batch as ``send`` would one by one, doing once per chunk what ``send``
does per command: the clock read, polling for delivery reports, and, with a sealing codec,
fetching or creating the data keys of the chunk's subjects in a few statements (a new
subject's key is otherwise one durable key-store commit during its ``send``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Self

from confluent_kafka import KafkaError, Message, Producer

from keel.bootstrap import edge_codec
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.domain.idempotency import check_within_window
from keel.domain.messages import payload_class
from keel.domain.principal import Principal
from keel.errors import AuthorizationDenied, DeliveryError, ValidationError
from keel.kafka.clients import producer_config
from keel.kafka.errors import KafkaWatch, is_authorization_error
from keel.kafka.topics import Topic, topic_name
from keel.trust.codec import SealingCodec

PRINCIPAL_TENANT_HEADER = "keel-principal-tenant"
SEND_CHUNK = 1_000  # commands per chunk of send_many: well inside the key cache and librdkafka's queue


@dataclass
class _Deliveries:
    acknowledged: int = 0
    failed: dict[uuid.UUID, str] = field(default_factory=dict)
    denied: KafkaError | None = None  # the first ACL denial among the failures


class CommandProducer:
    """Sends commands to Kafka directly; for trusted internal services."""

    def __init__(self, settings: Settings, codec: EnvelopeCodec | None = None,
                 principal: Principal | None = None) -> None:
        if codec is None:
            codec, self._release_codec = edge_codec(settings)  # seals personal fields when keys exist
        else:
            self._release_codec = lambda: None
        self._codec = codec
        self._principal = principal
        self._window_s = settings.processor_dedupe_window_s
        self._topic = topic_name(settings, Topic.COMMANDS)
        config = producer_config(settings)
        self._watch = KafkaWatch(config)
        self._producer = Producer(self._watch.config(config))
        self._deliveries = _Deliveries()
        self._headers: dict[str, list[tuple[str, str | bytes | None]]] = {}  # per tenant: built once

    def send(self, command: Envelope) -> None:
        """Queue ``command``; its delivery is confirmed by ``flush``."""
        self._check(command, datetime.now(UTC))
        self._produce(command)
        self._producer.poll(0)
        self._watch.check()

    def send_many(self, commands: Iterable[Envelope]) -> int:
        """Queue ``commands`` in order; returns how many. Their delivery is confirmed by ``flush``.

        Every command is checked (type, tenant, age) before any is queued, so a refused
        batch queues nothing; one that fails to encode raises with those before it queued.
        """
        batch = list(commands)
        now = datetime.now(UTC)
        for command in batch:
            self._check(command, now)
        cipher = self._codec.cipher if isinstance(self._codec, SealingCodec) else None
        for start in range(0, len(batch), SEND_CHUNK):
            chunk = batch[start:start + SEND_CHUNK]
            if cipher is not None:
                cipher.prepare(chunk)
            for command in chunk:
                self._produce(command)
            self._producer.poll(0)
            self._watch.check()
        return len(batch)

    def _check(self, command: Envelope, now: datetime) -> None:
        """Refuse an event, a command for another tenant than the principal's, or one beyond the dedupe window."""
        if payload_class(command.type).kind != "command":
            raise ValidationError(f"{command.type} is an event; only commands can be sent", field="type")
        if self._principal is not None and self._principal.tenant_id != command.tenant_id:
            raise ValidationError(f"this producer acts for tenant {self._principal.tenant_id!r}, the command "
                                  f"claims {command.tenant_id!r}", code="wrong_tenant", field="tenant_id")
        check_within_window(command, self._window_s, now)

    def _produce(self, command: Envelope) -> None:
        """Encode (and seal) ``command`` and hand it to librdkafka, serving delivery reports while its queue is full."""
        value = self._codec.encode(command)
        headers = self._headers.get(command.tenant_id)
        if headers is None:
            headers = self._headers[command.tenant_id] = [(PRINCIPAL_TENANT_HEADER, command.tenant_id.encode())]
        on_delivery = partial(self._delivered, command.id)
        while True:
            try:
                self._producer.produce(self._topic, value=value, key=command.key.encode(),
                                       headers=headers, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.1)
                self._watch.check()

    def _delivered(self, command_id: uuid.UUID, error: KafkaError | None, _message: Message) -> None:
        """librdkafka's delivery report of one command."""
        if error is None:
            self._deliveries.acknowledged += 1
        else:
            self._deliveries.failed[command_id] = error.str()
            if self._deliveries.denied is None and is_authorization_error(error):
                self._deliveries.denied = error

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for every queued command's delivery; returns how many were acknowledged."""
        deadline = time.monotonic() + timeout_s
        while True:  # in slices, so a refused login ends the wait at once
            remaining = self._producer.flush(max(0.0, min(0.2, deadline - time.monotonic())))
            self._watch.check()
            if not remaining or time.monotonic() >= deadline:
                break
        deliveries, self._deliveries = self._deliveries, _Deliveries()
        if deliveries.denied is not None:
            denied = self._watch.translate(deliveries.denied, resource=self._topic, operation="WRITE")
            assert isinstance(denied, AuthorizationDenied)
            raise AuthorizationDenied(
                f"{denied.message}; {len(deliveries.failed)} command(s) were not delivered",
                principal=denied.principal, resource=denied.resource, operation=denied.operation)
        if remaining:
            raise DeliveryError(f"{remaining} command(s) still unacknowledged after {timeout_s:.0f}s")
        if deliveries.failed:
            first = next(iter(deliveries.failed.items()))
            raise DeliveryError(
                f"{len(deliveries.failed)} command(s) were not delivered; first: {first[0]}: {first[1]}"
            )
        return deliveries.acknowledged

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()

    def close(self) -> None:
        """Release the key store the codec holds (the producer itself needs no closing)."""
        self._release_codec()
