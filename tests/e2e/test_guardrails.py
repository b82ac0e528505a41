"""Guardrail watchers and the processor together, with the watchers SIGKILLed mid-run.

An agent whose commands keep being rejected gets its circuit breaker tripped by the
breaker watcher (a TripBreaker command through the governed processor), after which its
commands are refused; a parked refund whose approval deadline passes is expired by the
approval watcher. Killing and restarting the watchers (at least once semantics) must
still yield exactly one BreakerTripped and one ApprovalExpired: their commands carry
deterministic ids and the processor dedupes them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keel.config import Settings
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.domain.messages import CommandRejected, SetPolicy
from keel.processor.worker import CommandProcessor
from keel.sdk.producer import CommandProducer
from keel.watchers import approvals, breaker
from tests.helpers import command, events, refund, start
from tests.processes import KeelProcess, remove_app_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POLICY = {"version": "guard-1", "roles": {"member": ["*"]}, "grants": {"*": ["member"]},
          "rules": [{"name": "big-refunds-need-admin", "decision": "approve",
                     "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}}}],
          "approval_ttl_seconds": 3}


@pytest.fixture
def processor(settings: Settings) -> Iterator[CommandProcessor]:
    """A processor deciding in the background for the whole test."""
    worker = CommandProcessor(settings, instance_id="guard")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    yield worker
    stop.set()
    thread.join(30)
    worker.close()


@pytest.fixture
def watchers(settings: Settings, tmp_path: Path) -> Iterator[list[KeelProcess]]:
    running = [KeelProcess(["watch", "breakers"], settings, tmp_path / "breakers.log",
                           KEEL_BREAKER_MIN_DECISIONS="10", KEEL_BREAKER_THRESHOLD="0.5"),
               KeelProcess(["watch", "approvals"], settings, tmp_path / "approvals.log")]
    yield running
    for process in running:
        process.stop(grace_s=5)
    remove_app_state(settings, breaker.app_id(settings))
    remove_app_state(settings, approvals.app_id(settings))


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_watchers_trip_the_breaker_and_expire_approvals_exactly_once_across_kills(
        settings: Settings, processor: CommandProcessor, watchers: list[KeelProcess]) -> None:
    with CommandProducer(settings) as producer:
        producer.send(command("acme", "controls", SetPolicy(document=json.dumps(POLICY)), actor=SYSTEM_ACTOR))
    time.sleep(2)  # the policy holds from the batch after the one that published it
    for process in watchers:
        process.start()
    big = command("acme", "sub-1", refund(500_000))
    with CommandProducer(settings) as producer:
        producer.send(command("acme", "sub-1", start(1_000_000)))
        producer.send(big)
        for _ in range(15):  # refunds on subscriptions that do not exist: all rejected
            producer.send(command("acme", "sub-missing", refund(1)))

    time.sleep(3)
    for process in watchers:  # at least once: kill both mid-run, then restart them
        process.kill()
        process.start()

    def types() -> list[str]:
        return [e.type for e in events(settings)]

    wait_for(lambda: "BreakerTripped" in types() and "ApprovalExpired" in types(), "the watchers' effects")
    with CommandProducer(settings) as producer:
        producer.send(command("acme", "sub-1", refund(10)))
    wait_for(lambda: any(isinstance(e.payload, CommandRejected) and e.payload.code == "breaker_open"
                         for e in events(settings)), "the open breaker to refuse the agent")
    time.sleep(5)  # give any duplicate a chance to show

    found = types()
    assert found.count("BreakerTripped") == 1
    assert found.count("ApprovalExpired") == 1
    expired = next(e for e in events(settings) if e.type == "ApprovalExpired")
    assert expired.payload.command_id == big.id  # type: ignore[attr-defined]
    assert "RefundIssued" not in [e.type for e in events(settings) if e.causation_id == big.id]
    for process in watchers:
        process.assert_alive()
