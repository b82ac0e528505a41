"""Pure rules of the approval expiry watcher: what is pending, what is due, what to send.

No faust and no Kafka here, so the rules are unit-tested in isolation.

``ApprovalRequested`` makes a command pending; ``ApprovalGranted``, ``ApprovalRejected`` and
``ApprovalExpired`` (all carrying ``command_id``) end it. The table key is
``tenant/aggregate/command_id``: the outcome events of an approval are written on the
aggregate of the paused command, so the add and the removal of a key come from the same
events partition, which is the partition faust writes the key's changelog record to
(exact recovery, any number of workers). The tenant in the key also means one tenant's
events can never end another tenant's pending approval.

A pending approval is due once ``expires_at`` has passed. The watcher then sends
``ExpireApproval(command_id)`` to the approval's own tenant and aggregate with the id
``uuid5(command_id, "expire")``: every re-send (a later tick, a restart) carries the same
id, which the processor dedupes, until ``ApprovalExpired`` (or a late grant) removes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from keel.domain.commands import ExpireApproval
from keel.domain.envelope import Actor, ActorKind, Authority, Envelope, new_command
from keel.domain.events import ApprovalExpired, ApprovalGranted, ApprovalRejected, ApprovalRequested

WATCHER_ACTOR = Actor(kind=ActorKind.SERVICE, id="keel-approval-watcher")
SYSTEM_AUTHORITY = Authority(role="system")
_SEPARATOR = "/"  # tenant and aggregate ids never contain '/'


class ApprovalSettings(BaseSettings):
    """How the approval watcher checks deadlines, from ``KEEL_APPROVALS_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="KEEL_APPROVALS_", frozen=True)

    tick_s: float = Field(default=1.0, gt=0, description="How often pending approvals are checked.")
    resend_s: float = Field(default=30.0, gt=0, description=(
        "How long to wait before sending an expiry again while the approval stays pending "
        "(same command id; the processor drops the duplicate)."))


@dataclass(frozen=True)
class Pending:
    """One command waiting for approval, and where its expiry must go."""

    tenant: str
    aggregate: str
    command_id: str
    expires_at: float  # epoch seconds
    correlation_id: str
    partition: int  # of the events topic: the worker that owns it sends its expiry
    requested_at: float = 0.0  # epoch seconds; 0 in entries written before it was kept

    @property
    def key(self) -> str:
        return pending_key(self.tenant, self.aggregate, self.command_id)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Pending:
        return cls(tenant=str(data["tenant"]), aggregate=str(data["aggregate"]),
                   command_id=str(data["command_id"]), expires_at=float(data["expires_at"]),
                   correlation_id=str(data["correlation_id"]), partition=int(data["partition"]),
                   requested_at=float(data.get("requested_at", 0.0)))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def due(self, now: float) -> bool:
        """Whether the deadline has passed at ``now`` (epoch seconds)."""
        return self.expires_at <= now


def pending_key(tenant: str, aggregate: str, command_id: uuid.UUID | str) -> str:
    """The table key of one pending approval."""
    return _SEPARATOR.join((tenant, aggregate, str(command_id)))


@dataclass(frozen=True)
class Change:
    """What an event does to the pending table: add ``pending`` or remove ``key``."""

    key: str
    pending: Pending | None  # None: the approval ended


def change_of(event: Envelope, partition: int) -> Change | None:
    """The change ``event`` (read from events ``partition``) makes, or ``None``."""
    payload = event.payload
    if isinstance(payload, ApprovalRequested):
        pending = Pending(tenant=event.tenant_id, aggregate=event.aggregate_id,
                          command_id=str(payload.command_id),
                          expires_at=payload.expires_at.timestamp(),
                          correlation_id=str(event.correlation_id), partition=partition,
                          requested_at=event.occurred_at.timestamp())
        return Change(pending.key, pending)
    if isinstance(payload, (ApprovalGranted, ApprovalRejected, ApprovalExpired)):
        return Change(pending_key(event.tenant_id, event.aggregate_id, payload.command_id), None)
    return None


def expire_command_id(command_id: uuid.UUID | str) -> uuid.UUID:
    """The deterministic id of the expiry of ``command_id``: ``uuid5(command_id, "expire")``."""
    return uuid.uuid5(uuid.UUID(str(command_id)), "expire")


def expire_command(pending: Pending, *, now: datetime | None = None) -> Envelope:
    """The ``ExpireApproval`` command for ``pending``, sent by the watcher as a system actor."""
    return new_command(ExpireApproval(command_id=uuid.UUID(pending.command_id)),
                       tenant_id=pending.tenant, aggregate_id=pending.aggregate,
                       actor=WATCHER_ACTOR, authority=SYSTEM_AUTHORITY,
                       command_id=expire_command_id(pending.command_id),
                       correlation_id=uuid.UUID(pending.correlation_id),
                       occurred_at=now or datetime.now(UTC))


def should_send(pending: Pending, *, now: float, last_sent: float | None, resend_s: float) -> bool:
    """Whether to send ``pending``'s expiry at ``now``, given when it was last sent (if ever)."""
    return pending.due(now) and (last_sent is None or now - last_sent >= resend_s)


@dataclass
class PendingSummary:
    """One tenant's pending approvals, for the metrics."""

    count: int = 0
    oldest_age_s: float = 0.0
    overdue: int = 0


def summarise_pending(entries: Iterable[Pending], now: float) -> dict[str, PendingSummary]:
    """Per tenant: how many wait, how long the oldest has waited, how many are past their deadline."""
    summary: dict[str, PendingSummary] = {}
    for entry in entries:
        tenant = summary.setdefault(entry.tenant, PendingSummary())
        tenant.count += 1
        tenant.overdue += entry.due(now)
        if entry.requested_at:
            tenant.oldest_age_s = max(tenant.oldest_age_s, now - entry.requested_at)
    return summary
