"""`keel audit show` tells a governed command's whole story from the real chain.

A big refund is parked by policy, approved by a lead with a comment, executed, then undone
by a compensation; the processor publishes it all and the chainer chains it. The trail of
the command (and of its subject) must hold every step, with the approver and the undo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind, Authority, Envelope
from keel.domain.governance.pipeline import CONTROLS_AGGREGATE
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.domain.messages import ApproveCommand, SetPolicy
from support_desk.messages import ReverseRefund
from keel.processor.worker import CommandProcessor
from keel.trust.chainer import Chainer
from keel.trust.settings import TrustSettings
from keel.trust.show import render_trail, select_trail
from keel.trust.store import read_audit
from tests.helpers import command, refund, send, start
from tests.plugins.trust import trust_env

pytestmark = pytest.mark.integration

LEAD = Actor(kind=ActorKind.HUMAN, id="jane.lead")
POLICY = {
    "version": "story-1",
    "roles": {"support-agent": ["*"], "admin": ["*"]},
    "grants": {"agent:support-bot": ["support-agent"], "human:jane.lead": ["admin"]},
    "rules": [{"name": "big-refunds-need-admin",
               "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}},
               "decision": "approve"}],
}


def step(settings: Settings, *commands: Envelope) -> None:
    """Send ``commands`` and let the processor decide them all (one step of the story)."""
    send(settings, *commands)
    processor = CommandProcessor(settings, instance_id="story")
    try:
        processor.run_until_caught_up()
    finally:
        processor.close()


def test_the_trail_of_an_approved_then_undone_refund_tells_the_whole_story(
        settings: Settings, chainer: Chainer, trust_settings: TrustSettings) -> None:
    step(settings, command("acme", CONTROLS_AGGREGATE, SetPolicy(document=json.dumps(POLICY)), actor=SYSTEM_ACTOR,
                           on_behalf_of=None))
    session = uuid.uuid4()  # the agent's conversation: the refund is not the root of its correlation
    big = command("acme", "sub-1", refund(150_000), correlation_id=session)
    step(settings, command("acme", "sub-1", start(500_000)), big,
         command("acme", "sub-2", start(500_000), on_behalf_of="cust-2"),
         command("acme", "sub-2", refund(2_000), on_behalf_of="cust-2"))
    # What `keel approve` and `keel undo` send: from the lead, with no subject or authority of their own.
    approve = command("acme", "sub-1", ApproveCommand(command_id=big.id, comment="long-standing customer"),
                      actor=LEAD, on_behalf_of=None, authority=Authority())
    step(settings, approve)
    undo = command("acme", "sub-1", ReverseRefund(refund_command_id=big.id, reason="disputed"), actor=LEAD,
                   on_behalf_of=None, authority=Authority(), causation_id=big.id, correlation_id=session)
    step(settings, undo)
    chainer.run_until_caught_up()
    records = read_audit(settings, "acme").records

    trail = select_trail(records, command=str(big.id))
    assert [r.entry.type for r in trail] == ["ApprovalRequested", "ApprovalGranted", "RefundIssued",
                                              "RefundReversed"]
    requested, granted, issued, reversed_ = lines = render_trail(trail)
    assert "agent:support-bot on behalf of cust-1" in requested
    assert "policy_rule=big-refunds-need-admin" in requested and "role=support-agent" in requested
    assert f"command_id={big.id}" in requested and f"(caused by {big.id})" in requested
    assert granted.split(" ")[2] == "human:jane.lead" and "role=admin" in granted
    assert f"command_id={big.id}" in granted
    assert 'approver=human:jane.lead comment="long-standing customer"' in granted
    assert f"(caused by {approve.id})" in granted
    assert "agent:support-bot on behalf of cust-1" in issued  # executed as the submitter's, approved by the lead
    assert f"approval_id={approve.id}" in issued and "policy_rule=big-refunds-need-admin" in issued
    assert f"(caused by {big.id})" in issued
    assert reversed_.split(" ")[2] == "human:jane.lead" and f"reverses={big.id}" in reversed_
    assert "reason=disputed" in reversed_ and "<- undoes earlier actions" in reversed_
    assert f"(caused by {undo.id})" in reversed_

    by_subject = select_trail(records, subject="cust-1")
    assert [r.entry.type for r in by_subject] == ["SubscriptionStarted", *(r.entry.type for r in trail)]
    assert render_trail(by_subject)[1:] == lines
    # Starting from the approval (or the undo) gives the same story of the refund.
    assert render_trail(select_trail(records, command=str(approve.id))) == lines
    assert render_trail(select_trail(records, command=str(undo.id))) == lines
    assert not any("cust-2" in line for line in render_trail(by_subject))

    env = trust_env(settings, trust_settings)
    for option, value, expected in (("--command", str(big.id), lines),
                                    ("--subject", "cust-1", render_trail(by_subject))):
        shown = subprocess.run([sys.executable, "-m", "keel.cli", "audit", "show", "--tenant", "acme", option,
                                value], env={**env, "COLUMNS": "250"}, capture_output=True, text=True,
                               timeout=60, check=False)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip().splitlines() == expected
