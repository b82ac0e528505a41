"""The producer SDK: sends validated commands to the tenant-partitioned commands topic.

An idempotent ``acks=all`` producer (no loss, no duplicates, no reordering on retry).
Delivery reports are collected and surfaced: ``flush`` raises ``DeliveryError`` naming
every command Kafka did not acknowledge, so a caller never believes a lost send. On a
secure broker a denied ACL raises ``AuthorizationDenied`` and a refused login
``AuthenticationFailed`` (as soon as librdkafka reports it, not after the flush timeout).

Every record carries the producing principal's tenant in the ``keel-principal-tenant``
header; the processor rejects a command whose envelope claims another tenant. A producer
built with a ``Principal`` refuses such a command before it leaves the process.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
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

PRINCIPAL_TENANT_HEADER = "keel-principal-tenant"


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

    def send(self, command: Envelope) -> None:
        """Queue ``command``; its delivery is confirmed by ``flush``."""
        if payload_class(command.type).kind != "command":
            raise ValidationError(f"{command.type} is an event; only commands can be sent", field="type")
        tenant = self._principal.tenant_id if self._principal else command.tenant_id
        if tenant != command.tenant_id:
            raise ValidationError(f"this producer acts for tenant {tenant!r}, the command claims "
                                  f"{command.tenant_id!r}", code="wrong_tenant", field="tenant_id")
        check_within_window(command, self._window_s)
        value = self._codec.encode(command)
        headers: list[tuple[str, str | bytes | None]] = [(PRINCIPAL_TENANT_HEADER, tenant.encode())]

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                self._deliveries.acknowledged += 1
            else:
                self._deliveries.failed[command.id] = error.str()
                if self._deliveries.denied is None and is_authorization_error(error):
                    self._deliveries.denied = error

        while True:
            try:
                self._producer.produce(self._topic, value=value, key=command.key.encode(),
                                       headers=headers, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.1)
                self._watch.check()
        self._producer.poll(0)
        self._watch.check()

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
