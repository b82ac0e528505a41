"""The approval expiry watcher against the real broker: due approvals expire, once, by id.

The watcher runs as its own process (``keel watch approvals``) on this test's topics. The
test plays the processor: it writes ApprovalRequested / ApprovalGranted / ApprovalExpired
events and reads back the ExpireApproval commands the watcher sends.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, Envelope, new_command
from keel.domain.messages import ApprovalExpired, ApprovalGranted, ApprovalKind, ApprovalRequested, ApproveCommand, ExpireApproval
from support_desk.messages import IssueRefund
from keel.domain.outcomes import to_events
from keel.kafka.clients import producer_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.watchers.approvals import TABLE, app_id
from keel.watchers.approvals_rules import expire_command_id
from tests.processes import KeelProcess, remove_app_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RECOVERED = '"event": "approval_table_recovered"'
AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
APPROVER = Actor(kind=ActorKind.HUMAN, id="alice")


def _watcher(settings: Settings, log: Path) -> KeelProcess:
    """A ``keel watch approvals`` worker on this test's topics, its output in ``log``."""
    return KeelProcess(["watch", "approvals"], settings, log, KEEL_APPROVALS_TICK_S="0.5")


@pytest.fixture
def watcher(settings: Settings, tmp_path: Path) -> Iterator[KeelProcess]:
    """A watcher on this test's topics; killed at the end, its topics and group removed."""
    running = _watcher(settings, tmp_path / "watcher.log")
    try:
        yield running
    finally:
        running.stop(grace_s=5.0)
        remove_app_state(settings, app_id(settings))


def _paused(tenant: str, aggregate: str, expires_in_s: float) -> tuple[Envelope, Envelope]:
    """A refund command that needs approval, and the ApprovalRequested event it produced."""
    command = new_command(IssueRefund(amount_cents=90_000, currency="EUR", reason="goodwill"),
                          tenant_id=tenant, aggregate_id=aggregate, actor=AGENT)
    requested = ApprovalRequested(
        command_id=command.id, command_type=command.type, approval_kind=ApprovalKind.APPROVAL,
        policy_rule="refund-over-500", policy_version="v1",
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in_s),
        command=command.model_dump_json())
    [event] = to_events(command, [requested], version=3, now=datetime.now(UTC))
    return command, event


def _ended(tenant: str, aggregate: str, command_id: uuid.UUID, *, granted: bool) -> Envelope:
    """ApprovalGranted (an approver's) or ApprovalExpired (the processor's) for ``command_id``."""
    if granted:
        cause = new_command(ApproveCommand(command_id=command_id), tenant_id=tenant,
                            aggregate_id=aggregate, actor=APPROVER)
        payload: ApprovalGranted | ApprovalExpired = ApprovalGranted(command_id=command_id,
                                                                     approver=APPROVER.id)
    else:
        cause = new_command(ExpireApproval(command_id=command_id), tenant_id=tenant,
                            aggregate_id=aggregate, actor=APPROVER)
        payload = ApprovalExpired(command_id=command_id)
    [event] = to_events(cause, [payload], version=4, now=datetime.now(UTC))
    return event


def _produce(settings: Settings, events: list[Envelope | bytes]) -> None:
    """Write ``events`` (envelopes, or raw bytes that are not one) to the events topic."""
    codec, producer = EnvelopeCodec(), Producer(producer_config(settings))
    for event in events:
        if isinstance(event, bytes):
            producer.produce(topic_name(settings, Topic.EVENTS), event, key="acme/sub-1")
        else:
            producer.produce(topic_name(settings, Topic.EVENTS), codec.encode(event), key=event.key)
    assert producer.flush(15) == 0


def _expiries(settings: Settings) -> dict[uuid.UUID, list[tuple[Envelope, bytes | None]]]:
    """ExpireApproval commands on the commands topic, by the command id they expire."""
    codec = EnvelopeCodec()
    found: dict[uuid.UUID, list[tuple[Envelope, bytes | None]]] = {}
    for message in read_to_end(settings, topic_name(settings, Topic.COMMANDS)):
        command = codec.decode(message.value() or b"")
        if isinstance(command.payload, ExpireApproval):
            found.setdefault(command.payload.command_id, []).append((command, message.key()))
    return found


def _wait_for(check: Callable[[], bool], what: str, watcher: KeelProcess, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        watcher.assert_alive()
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def test_due_approvals_expire_once_with_their_id_and_granted_ones_never(
    settings: Settings, watcher: KeelProcess
) -> None:
    overdue_cmd, overdue = _paused("acme", "sub-1", expires_in_s=-60)
    soon_cmd, soon = _paused("acme", "sub-2", expires_in_s=2)
    granted_cmd, granted = _paused("globex", "sub-1", expires_in_s=3)
    # another tenant's grant naming acme's command id must not end acme's approval
    other_cmd, other = _paused("acme", "sub-3", expires_in_s=4)
    stray_grant = _ended("globex", "sub-3", other_cmd.id, granted=True)
    _produce(settings, [b"not a keel message", overdue, soon, granted,
                        _ended("globex", "sub-1", granted_cmd.id, granted=True), other, stray_grant])
    watcher.start()

    due = {overdue_cmd.id: overdue_cmd, soon_cmd.id: soon_cmd, other_cmd.id: other_cmd}
    _wait_for(lambda: set(_expiries(settings)) >= set(due), "three ExpireApproval commands", watcher)
    # play the processor: the expiries are applied, the approvals end
    _produce(settings, [_ended(c.tenant_id, c.aggregate_id, c.id, granted=False) for c in due.values()])
    time.sleep(3.0)  # a duplicate, or the granted approval's expiry, would be sent by now

    expiries = _expiries(settings)
    assert set(expiries) == set(due), "the granted approval must not expire"
    for command_id, paused in due.items():
        [(expire, key)] = expiries[command_id]
        assert expire.id == expire_command_id(command_id) == uuid.uuid5(command_id, "expire")
        assert (expire.tenant_id, expire.aggregate_id) == (paused.tenant_id, paused.aggregate_id)
        assert key == paused.key.encode()
        assert expire.actor == Actor(kind=ActorKind.SERVICE, id="keel-approval-watcher")
        assert expire.authority.role == "system"
        assert expire.correlation_id == paused.correlation_id
    [(soon_expire, _)] = expiries[soon_cmd.id]
    assert isinstance(soon.payload, ApprovalRequested)
    assert soon_expire.occurred_at >= soon.payload.expires_at, "sent before its deadline"


def _in_changelog(settings: Settings, command_id: uuid.UUID) -> bool:
    topic = f"{app_id(settings)}-{TABLE}-changelog"
    try:
        return any(str(command_id).encode() in (m.key() or b"") for m in read_to_end(settings, topic, 5.0))
    except Exception:  # the watcher has not created its changelog yet
        return False


def test_pending_approvals_survive_kill_9_and_resends_keep_the_id(
    settings: Settings, watcher: KeelProcess
) -> None:
    overdue_cmd, overdue = _paused("acme", "sub-1", expires_in_s=-1)
    later_cmd, later = _paused("acme", "sub-2", expires_in_s=12)
    watcher.start(KEEL_APPROVALS_RESEND_S="2")
    _produce(settings, [overdue, later])
    _wait_for(lambda: overdue_cmd.id in _expiries(settings), "the overdue approval's expiry", watcher)
    _wait_for(lambda: _in_changelog(settings, later_cmd.id), "the later approval in the table", watcher)

    watcher.stop(sig=signal.SIGKILL)
    restarted_at = len(watcher.output())
    watcher.start(KEEL_APPROVALS_RESEND_S="2")
    _wait_for(lambda: RECOVERED in watcher.output()[restarted_at:], "the table's recovery", watcher)
    _wait_for(lambda: str(expire_command_id(later_cmd.id)) in watcher.output()[restarted_at:],
              "the restarted watcher to expire the recovered approval", watcher)
    assert str(expire_command_id(overdue_cmd.id)) in watcher.output()[restarted_at:], (
        "the still pending overdue approval is re-sent after the restart")

    expiries = _expiries(settings)
    assert set(expiries) == {overdue_cmd.id, later_cmd.id}
    for command_id, sent in expiries.items():
        assert {expire.id for expire, _ in sent} == {expire_command_id(command_id)}
    assert len(expiries[overdue_cmd.id]) >= 2, "re-sent while pending, under the same id"


def test_two_workers_split_the_partitions_and_expire_each_approval_once(
    settings: Settings, watcher: KeelProcess, tmp_path: Path
) -> None:
    second = _watcher(settings, tmp_path / "second.log")
    try:
        watcher.start()
        second.start()
        _wait_for(lambda: RECOVERED in watcher.output() and RECOVERED in second.output(),
                  "both workers to recover their partitions", watcher)
        time.sleep(2.0)  # let the group settle: a late rebalance would move partitions mid-test
        paused = [_paused("acme", f"sub-{index}", expires_in_s=-1) for index in range(9)]
        _produce(settings, [event for _, event in paused])
        ids = {command.id for command, _ in paused}
        _wait_for(lambda: set(_expiries(settings)) == ids, "nine expiries", watcher)
        time.sleep(2.0)
        assert all(len(sent) == 1 for sent in _expiries(settings).values()), "one worker per approval"
        sent_by = [log.count('"type": "ExpireApproval"') for log in (watcher.output(), second.output())]
        assert sum(sent_by) == 9 and min(sent_by) > 0, sent_by
    finally:
        second.stop(grace_s=5.0)
