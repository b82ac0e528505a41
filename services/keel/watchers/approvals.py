"""The approval expiry watcher: sends ``ExpireApproval`` for approvals past their deadline.

One faust agent reads ``<prefix>.events`` as raw bytes and keeps the ``pending`` table
(rules and keys in ``keel.watchers.approvals_rules``): ``ApprovalRequested`` adds,
``ApprovalGranted`` / ``ApprovalRejected`` / ``ApprovalExpired`` remove. Every key is
written from the events partition of its tenant/aggregate, which is the changelog
partition faust uses, so a restarted worker recovers exactly the approvals still pending.

A timer checks the table every ``tick_s`` once the table is recovered and no rebalance
runs, and sends the expiry of every due approval on a partition this worker owns. A
timer cannot write tables in faust (no current event), and need not: the command id is
deterministic, so the only state is when each expiry was last sent, kept in memory to
space re-sends ``resend_s`` apart. Losing it on restart costs one duplicate, which the
processor drops. A failed send is logged and retried at the next tick (same id); it never
stops the timer. The approval leaves the table when the processor's ``ApprovalExpired``
comes back on the events topic.
"""

from __future__ import annotations

import json
import logging
import time

import faust

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.kafka.topics import Topic, topic_name
from keel.observability.metrics import APPROVAL_OLDEST_AGE, APPROVALS_OVERDUE, APPROVALS_PENDING, bounded
from keel.watchers.approvals_rules import (
    ApprovalSettings,
    Pending,
    change_of,
    expire_command,
    should_send,
    summarise_pending,
)
from keel.watchers.common import CHANGELOG_CONFIG, decode, log_event, new_app, send_command

log = logging.getLogger(__name__)

TABLE = "pending"


def app_id(settings: Settings) -> str:
    """The faust app id (consumer group, and prefix of its internal topics)."""
    return f"{settings.topic_prefix}.approval-watcher"


def build_app(settings: Settings, rules: ApprovalSettings | None = None) -> faust.App:
    """The approval watcher app for ``settings``: one agent, one table, one timer."""
    rules = rules or ApprovalSettings()
    app = new_app(settings, app_id(settings))
    events_name = topic_name(settings, Topic.EVENTS)
    events = app.topic(events_name, key_serializer="raw", value_serializer="raw")
    commands = app.topic(topic_name(settings, Topic.COMMANDS), key_serializer="raw",
                         value_serializer="raw")

    async def recovered() -> None:
        """Say when the table is back from its changelog (tests and operators wait on it)."""
        log_event("approval_table_recovered", app=app.conf.id, pending=len(pending))

    pending = app.Table(
        TABLE,
        default=dict,
        help="Approvals still pending per tenant/aggregate/command id, with their deadline.",
        partitions=settings.topic_partitions,
        extra_topic_configs=CHANGELOG_CONFIG,
        on_recover=recovered,
    )
    codec = EnvelopeCodec()
    last_sent: dict[str, float] = {}  # key -> when its expiry was last sent (see docstring)

    @app.agent(events, name="approval-track")
    async def track(stream: faust.StreamT[bytes]) -> None:
        """Add requested approvals to the table and remove ended ones."""
        async for event in stream.events():
            message = event.message
            envelope = decode(codec, event.value, message)
            change = None if envelope is None else change_of(envelope, message.partition)
            if change is None:
                continue
            if change.pending is not None:
                pending[change.key] = change.pending.to_json()
            elif change.key in pending:
                del pending[change.key]
                last_sent.pop(change.key, None)

    async def expire() -> None:
        """Send the expiry of each due approval this worker owns."""
        if not _settled(app):
            return
        owned = {tp.partition for tp in app.consumer.assignment() if tp.topic == events_name}
        now = time.time()
        _publish_gauges([entry for value in list(pending.values())
                         if (entry := Pending.from_json(value)).partition in owned], now)
        for key in [key for key in last_sent if key not in pending]:  # ended on another worker
            del last_sent[key]
        for key, value in list(pending.items()):
            entry = Pending.from_json(value)
            if entry.partition not in owned or key not in pending:  # moved or ended meanwhile
                continue
            if should_send(entry, now=now, last_sent=last_sent.get(key), resend_s=rules.resend_s):
                try:
                    await send_command(commands, codec, expire_command(entry))
                except Exception as exc:  # noqa: BLE001 - any send failure: retry at the next tick
                    log.warning(json.dumps({"event": "expire_send_failed", "key": key,
                                            "error": repr(exc)}))
                    return
                last_sent[key] = now

    app.timer(rules.tick_s, name="approval-expire")(expire)  # untyped decorator: applied here
    return app


def _publish_gauges(entries: list[Pending], now: float) -> None:
    """The pending approvals of the partitions this worker owns, as gauges (summed over workers)."""
    summary = summarise_pending(entries, now)
    APPROVALS_PENDING.set(bounded(((t, s.count) for t, s in summary.items()), lambda a, b: a + b))
    APPROVAL_OLDEST_AGE.set(bounded(((t, s.oldest_age_s) for t, s in summary.items()), max))
    APPROVALS_OVERDUE.set(bounded(((t, s.overdue) for t, s in summary.items()), lambda a, b: a + b))


def _settled(app: faust.App) -> bool:
    """Whether the tables are recovered and no rebalance is under way."""
    recovery = app.tables.recovery  # type: ignore[attr-defined]  # on the class, not TableManagerT
    return (recovery.completed.is_set() and not recovery.in_recovery
            and not app.rebalancing)

