"""The chainer SIGKILLed 12 times while 10,000 events flow: every chain stays gapless, duplicate-free, verifiable."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from confluent_kafka import Consumer, TopicPartition

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from support_desk.messages import RefundIssued
from keel.domain.outcomes import to_events
from keel.kafka.clients import consumer_config
from keel.kafka.topics import Topic, topic_name
from keel.trust.chainer import Chainer
from keel.trust.checkpoints import CheckpointSigner, TrustedKeys
from keel.trust.record import parse_record
from keel.trust.settings import TrustSettings
from keel.trust.store import produce_raw, read_audit
from keel.trust.verify import verify_chain
from tests.helpers import command, refund
from tests.plugins.trust import trust_env

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "keel.cli"]
TENANTS = ("t-a", "t-b", "t-c", "t-d", "t-e")
KILLS = 12


def intake_values(per_tenant: int) -> list[tuple[bytes, bytes]]:
    """Real encoded events, keyed by tenant as the processor writes them to the intake."""
    codec, out = EnvelopeCodec(), []
    for i in range(per_tenant):
        for tenant in TENANTS:
            cmd = command(tenant, f"sub-{i % 7}", refund(1 + i))
            [event] = to_events(cmd, [RefundIssued(amount_cents=1 + i, currency="EUR", reason="r")],
                                version=i, now=cmd.occurred_at)
            out.append((tenant.encode(), codec.encode(event)))
    return out


def backlog(settings: Settings) -> int:
    """Intake records not yet committed by the chainer group (markers make it overcount by a few)."""
    intake = topic_name(settings, Topic.AUDIT_INTAKE)
    probe = Consumer(consumer_config(settings, f"{settings.topic_prefix}.chainer"))
    try:
        parts = [TopicPartition(intake, p) for p in range(settings.topic_partitions)]
        committed = {tp.partition: max(tp.offset, 0) for tp in probe.committed(parts, timeout=10)}
        return sum(probe.get_watermark_offsets(tp, timeout=10)[1] - committed[tp.partition] for tp in parts)
    finally:
        probe.close()


def test_chainer_killed_repeatedly_leaves_every_chain_exactly_once_and_verifiable(
        settings: Settings, trust_settings: TrustSettings, trusted_keys: TrustedKeys) -> None:
    values = intake_values(2000)  # 10,000 intake records over 5 tenants
    env = trust_env(settings, trust_settings)
    rng = random.Random(5)

    def feed() -> None:
        for start in range(0, len(values), 800):  # spread over the whole kill schedule
            produce_raw(settings, Topic.AUDIT_INTAKE, values[start:start + 800])
            time.sleep(2.5)

    feeder = threading.Thread(target=feed)
    feeder.start()
    kills, backlogs = 0, []
    try:
        for run_for in [rng.uniform(2.5, 4.0) for _ in range(KILLS)]:  # start (~2 s), chain, die mid-stream
            chainer = subprocess.Popen([*CLI, "chain", "--no-supervise", "--instance", "crash"], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(run_for)
            chainer.send_signal(signal.SIGKILL)
            chainer.wait(30)
            kills += 1
            backlogs.append(backlog(settings))
    finally:
        feeder.join(120)

    final = Chainer(settings, CheckpointSigner.from_settings(trust_settings), instance_id="crash",
                    checkpoint_every=trust_settings.audit_checkpoint_every)
    try:
        final.run_until_caught_up(timeout_s=120)
    finally:
        final.close()

    # at least one death left intake unchained (beyond the one commit marker per partition)
    assert kills == KILLS and max(backlogs) > settings.topic_partitions, backlogs
    produced = Counter(key.decode() for key, _ in values)
    for tenant in TENANTS:
        audit = read_audit(settings, tenant)
        report = verify_chain(tenant, audit.records, audit.checkpoints, trusted_keys)
        assert report.ok, report.summary()
        ids = [parse_record(r).entry.entry_id for r in audit.records]
        assert len(ids) == len(set(ids)) == produced[tenant]
        assert max(cp.seq for cp in audit.checkpoints) == len(ids)
