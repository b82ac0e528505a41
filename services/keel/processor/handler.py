"""What the processor does with one record from the commands topic, without Kafka I/O.

A record ends in exactly one outcome: events to publish (the command's governed
decision, rejections included), a dead letter (bytes that are not a command at all, or a
handler crash, with the reason), or a duplicate (already decided; acknowledged, not
re-executed). A command whose envelope is identifiable but whose payload breaks its
schema is rejected with an event, so the producer can see why.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from fastavro import schemaless_reader

from keel.contracts.codec import HEADER_SIZE, EnvelopeCodec
from keel.domain.envelope import Actor, Authority, Envelope
from keel.domain.governance.controls import Controls
from keel.domain.governance.pipeline import Context, Decision, govern
from keel.domain.governance.ratelimit import RateLimiter
from keel.domain.idempotency import BEYOND_WINDOW, beyond_window_reason
from keel.domain.outcomes import to_events
from keel.domain.deciding import reject
from keel.errors import KeelError, ValidationError
from keel.logs import command_fields
from keel.processor.state import BatchView
from keel.sdk.producer import PRINCIPAL_TENANT_HEADER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decided:
    """The command was decided; these events (and controls records) are its outcome."""

    command: Envelope
    decision: Decision


@dataclass(frozen=True)
class DeadLetter:
    """The record cannot be processed; it goes to the DLQ with the reason."""

    code: str
    reason: str


@dataclass(frozen=True)
class Duplicate:
    """The command id was decided before; acknowledged without re-executing."""

    command: Envelope


Outcome = Decided | DeadLetter | Duplicate


@dataclass
class Governance:
    """The worker-wide inputs of every decision besides the aggregate."""

    controls: Controls
    limiter: RateLimiter
    _contexts: dict[tuple[str, bytes | None], Context] = field(default_factory=dict, repr=False)
    _at: datetime | None = field(default=None, repr=False)

    def context(self, tenant_id: str, principal: bytes | None, now: datetime) -> Context:
        """The context of a decision for ``tenant_id``'s command, sent by a producer of ``principal``'s tenant.

        Built once per tenant and producer tenant for each decision time (the processor's is
        its batch's): a tenant's controls are read at its first command of a batch, as
        another worker's switch applies from this worker's next batch on.
        """
        if now is not self._at:
            self._contexts.clear()
            self._at = now
        context = self._contexts.get((tenant_id, principal))
        if context is None:
            context = self._contexts[(tenant_id, principal)] = Context(
                self.controls.of(tenant_id), self.limiter, now,
                principal_tenant=principal.decode() if principal is not None else None)
        return context


def handle(value: bytes | None, key: bytes | None, headers: Mapping[str, bytes | None], partition: int,
           view: BatchView, codec: EnvelopeCodec, governance: Governance, now: datetime | None = None) -> Outcome:
    """Decode, check and decide one commands-topic record against the batch's state.

    ``now`` is the decision time (default: the clock); the processor reads it once per
    batch, since a batch is decided and committed as one transaction.
    """
    if value is None:
        return DeadLetter("empty_record", "the record has no value")
    try:
        command = codec.decode(value)
    except ValidationError as exc:
        return _invalid_payload(value, key, exc, codec) or DeadLetter(exc.code, exc.message)
    except KeelError as exc:
        return DeadLetter(exc.code, exc.message)
    if command.payload.kind != "command":  # decoding gave the payload the class its type names
        return DeadLetter("not_a_command", f"{command.type} is an event, not a command")
    aggregate_key = command.key  # a property that formats the key: once, not twice
    if key != aggregate_key.encode():
        # The key decides the partition, and so which worker owns the aggregate and under
        # which key its events are written: a record keyed for another aggregate, or for
        # the same aggregate id of another tenant, would split one aggregate's state or
        # put one tenant's events under another tenant's key.
        return DeadLetter("key_mismatch", f"record key {key!r} is not the envelope's {command.key!r}")
    if view.already_decided(partition, command.id):
        return Duplicate(command)
    context = governance.context(command.tenant_id, headers.get(PRINCIPAL_TENANT_HEADER), now or datetime.now(UTC))
    if not view.remembers_ids_from(partition, command.occurred_at.timestamp(), context.now_s):
        return DeadLetter(BEYOND_WINDOW, beyond_window_reason(command, view.dedupe_window_s(partition)))
    try:
        decision = govern(command, view.state(partition, aggregate_key), context)
    except Exception as exc:  # noqa: BLE001 - a crashing handler must not stop the partition
        log.exception("handler crashed on command %s", command.id, extra=command_fields(command))
        return DeadLetter("handler_error", f"{type(exc).__name__}: {exc}")
    view.record(partition, command.id, decision.events)
    return Decided(command, decision)


def _invalid_payload(value: bytes, key: bytes | None, error: ValidationError,
                     codec: EnvelopeCodec) -> Decided | None:
    """A rejection event for a well-addressed command whose payload breaks its schema."""
    try:
        writer = codec.catalog.writer(bytes(value[2:HEADER_SIZE]))
        record = cast(dict[str, Any], schemaless_reader(io.BytesIO(value[HEADER_SIZE:]), writer.parsed, writer.parsed))
        shell = Envelope.model_construct(
            id=record["id"], tenant_id=record["tenant_id"], actor=Actor.model_validate(record["actor"]),
            delegation=(), on_behalf_of=record.get("on_behalf_of"), authority=Authority(),
            type=record["type"], aggregate_id=record["aggregate_id"], correlation_id=record["correlation_id"],
            traceparent=record.get("traceparent"))
        if key != shell.key.encode() or not error.field or not error.field.startswith("payload"):
            return None
        payload = reject(shell, "schema_violation", error.message)
        events = to_events(shell, [payload], version=0, now=datetime.now(UTC))
        Envelope.model_validate(events[0].model_dump())  # ids and addressing must be valid
        return Decided(shell, Decision(events))
    except Exception:  # noqa: BLE001 - not identifiable enough: the caller dead-letters it
        return None
