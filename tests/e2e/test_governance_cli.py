"""Governance from the command line: policy, approval, undo and dead letters, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from keel.config import Settings
from keel.kafka.clients import producer_config
from keel.kafka.reader import read_to_end, record_headers
from keel.kafka.topics import Topic, topic_name
from keel.processor.worker import CommandProcessor
from keel.sdk.producer import CommandProducer
from tests.helpers import command, events, refund, start

POLICY = {
    "version": "cli-1",
    "roles": {"support-agent": ["*"], "admin": ["*"]},
    "grants": {"agent:support-bot": ["support-agent"], "human:jane.lead": ["admin"]},
    "rules": [{"name": "big-refunds-need-admin",
               "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}},
               "decision": "approve"}],
}


@pytest.fixture
def processor(settings: Settings) -> Iterator[CommandProcessor]:
    worker = CommandProcessor(settings, instance_id="cli")
    yield worker
    worker.close()


def keel(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
           "KEEL_TOPIC_PARTITIONS": str(settings.topic_partitions), "KEEL_DATA_DIR": str(settings.data_dir),
           "COLUMNS": "250"}
    result = subprocess.run([sys.executable, "-m", "keel.cli", *args], env=env, text=True, capture_output=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result


def test_an_admin_approves_a_parked_refund_and_then_undoes_it(
        settings: Settings, processor: CommandProcessor, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    keel(settings, "policy", "apply", str(policy), "--tenant", "acme")
    processor.run_until_caught_up()  # a policy holds from the batch after the one that published it
    big = command("acme", "sub-1", refund(150_000))
    with CommandProducer(settings) as producer:
        producer.send(command("acme", "sub-1", start(500_000)))
        producer.send(big)
    processor.run_until_caught_up()

    listed = keel(settings, "approvals", "list", "--tenant", "acme").stdout
    assert str(big.id) in listed and "big-refunds-need-admin" in listed

    keel(settings, "approve", str(big.id), "--tenant", "acme", "--as", "human:jane.lead", "--comment", "ok")
    processor.run_until_caught_up()
    keel(settings, "undo", str(big.id), "--tenant", "acme", "--as", "human:jane.lead", "--reason", "disputed")
    processor.run_until_caught_up()

    trail = [(e.type, e.actor.id) for e in events(settings) if e.aggregate_id == "sub-1"]
    assert trail == [("SubscriptionStarted", "support-bot"), ("ApprovalRequested", "support-bot"),
                     ("ApprovalGranted", "jane.lead"), ("RefundIssued", "support-bot"),
                     ("RefundReversed", "jane.lead")]
    assert "sub-1" not in keel(settings, "approvals", "list", "--tenant", "acme").stdout
    [reversal] = [e for e in events(settings) if e.type == "RefundReversed"]
    assert reversal.correlation_id == big.correlation_id  # one trail: the refund and what undid it


def test_dead_letters_are_listed_shown_and_redriven(settings: Settings, processor: CommandProcessor) -> None:
    producer = Producer(producer_config(settings))
    producer.produce(topic_name(settings, Topic.COMMANDS), b"garbage", b"acme/sub-1")
    producer.flush(10)
    processor.run_until_caught_up()

    listed = keel(settings, "dlq", "list").stdout
    assert "undecodable" in listed
    position = next(line.split("│")[1].strip() for line in listed.splitlines() if "undecodable" in line)
    assert "keel-source-offset" in keel(settings, "dlq", "show", position).stdout
    assert "redrove 1" in keel(settings, "dlq", "redrive", position).stdout

    redriven = [m for m in read_to_end(settings, topic_name(settings, Topic.COMMANDS))
                if any(k == "keel-redriven-from" for k, _ in record_headers(m))]
    assert [m.value() for m in redriven] == [b"garbage"]
