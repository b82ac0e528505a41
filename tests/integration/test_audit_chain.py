"""The audit chain on a real broker: processor -> intake -> chainer -> verify, and tampering."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message, TopicPartition
from confluent_kafka.admin import AdminClient

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind, Authority, DelegationLink, Envelope
from support_desk.messages import CancelSubscription
from keel.kafka.clients import admin_config
from keel.kafka.topics import Topic, topic_name
from keel.processor.worker import CommandProcessor
from keel.sdk.producer import CommandProducer
from keel.trust.chainer import Chainer
from keel.trust.checkpoints import CheckpointSigner, TrustedKeys
from keel.trust.record import parse_record
from keel.trust.settings import TrustSettings
from keel.trust.store import TenantAudit, export_audit, produce_raw, read_audit
from keel.trust.verify import FailureKind, verify_chain
from tests.helpers import command, events, refund, start
from tests.plugins.trust import make_trust_settings, own_topics, trust_env

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "keel.cli"]
LEAD = Actor(kind=ActorKind.HUMAN, id="lead-ann")


def story(tenant: str, n: int) -> list[Envelope]:
    """Per subscription: start, two refunds (one rejected), cancel; delegated by a lead."""
    out = []
    for i in range(n):
        kw: dict[str, Any] = {"on_behalf_of": f"cust-{i}", "authority": Authority(role="support", grant="refunds"),
              "delegation": (DelegationLink(actor=LEAD, reason="customer called"),)}
        out += [command(tenant, f"sub-{i}", start(), **kw), command(tenant, f"sub-{i}", refund(2000), **kw),
                command(tenant, f"sub-{i}", refund(90000), **kw),
                command(tenant, f"sub-{i}", CancelSubscription(reason="asked"), **kw)]
    return out


def run_pipeline(settings: Settings, chainer: Chainer, *commands: object) -> None:
    with CommandProducer(settings) as producer:
        for cmd in commands:
            producer.send(cmd)  # type: ignore[arg-type]
    processor = CommandProcessor(settings, instance_id="test")
    try:
        processor.run_until_caught_up()
    finally:
        processor.close()
    chainer.run_until_caught_up()


@dataclass(frozen=True)
class World:
    """Chained real data, shared by the read-only tests of this module."""

    settings: Settings
    trust: TrustSettings
    audits: dict[str, TenantAudit]


@pytest.fixture(scope="module")
def world(broker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    trust = make_trust_settings(tmp_path_factory.mktemp("trust"))
    with own_topics(broker_settings) as settings:
        chain_story(settings, trust, *story("acme", 20), *story("globex", 5))
        yield World(settings, trust, {t: read_audit(settings, t) for t in ("acme", "globex")})


def chain_story(settings: Settings, trust: TrustSettings, *commands: object) -> None:
    chainer = Chainer(settings, CheckpointSigner.from_settings(trust), instance_id="test",
                      checkpoint_every=trust.audit_checkpoint_every)
    try:
        run_pipeline(settings, chainer, *commands)
    finally:
        chainer.close()


def test_every_event_is_chained_once_in_log_order_and_verifies_with_signed_checkpoints(world: World) -> None:
    settings, chained, trusted_keys = world.settings, world.audits, TrustedKeys.from_settings(world.trust)
    for tenant, audit in chained.items():
        report = verify_chain(tenant, audit.records, audit.checkpoints, trusted_keys)
        assert report.ok, report.summary()
        expected = [str(e.id) for e in events(settings) if e.tenant_id == tenant]
        chained_ids = [parse_record(r).entry.entry_id for r in audit.records]
        assert sorted(chained_ids) == sorted(expected) and len(set(chained_ids)) == len(chained_ids)
        assert max(cp.seq for cp in audit.checkpoints) == len(audit.records)  # the tail is signed
    assert len(chained["acme"].records) == 80
    assert {cp.seq for cp in chained["acme"].checkpoints} >= {50, 80}


def test_chains_continue_from_committed_heads_and_tampering_in_kafka_is_detected(
        settings: Settings, trust_settings: TrustSettings, trusted_keys: TrustedKeys) -> None:
    chain_story(settings, trust_settings, *story("acme", 2), *story("globex", 2))
    first = read_audit(settings, "acme").records
    produce_raw(settings, Topic.AUDIT_INTAKE, [(b"acme", parse_record(r).entry.body) for r in first[:4]])
    later = Chainer(settings, CheckpointSigner.from_settings(trust_settings), instance_id="test")
    try:
        later.run_until_caught_up()  # the restarted instance folds the committed heads first
    finally:
        later.close()
    audit = read_audit(settings, "acme")
    assert len(audit.records) == 12 and audit.records[:8] == first
    assert verify_chain("acme", audit.records, audit.checkpoints, trusted_keys).ok

    produce_raw(settings, Topic.AUDIT, [(b"acme", read_audit(settings, "globex").records[3])])
    audit = read_audit(settings, "acme")
    report = verify_chain("acme", audit.records, audit.checkpoints, trusted_keys)
    assert report.failure is not None
    assert (report.failure.seq, report.failure.kind) == (13, FailureKind.FOREIGN_TENANT)

    topic = topic_name(settings, Topic.AUDIT)
    [partition] = {m.partition() for m in _messages(settings, topic) if m.key() == b"acme"}
    assert partition is not None
    admin = AdminClient(admin_config(settings))
    for future in admin.delete_records([TopicPartition(topic, partition, 3)]).values():
        future.result()
    audit = read_audit(settings, "acme")
    report = verify_chain("acme", audit.records, audit.checkpoints, trusted_keys)
    assert report.failure is not None
    assert (report.failure.seq, report.failure.kind) == (1, FailureKind.MISSING)


def _messages(settings: Settings, topic: str) -> list[Message]:
    from keel.kafka.reader import read_to_end
    return list(read_to_end(settings, topic))


@pytest.mark.parametrize(("tamper", "seq", "kind"), [
    ("edit", 7, "edited_record"),
    ("reorder", 7, "reordered"),
    ("delete", 7, "missing_record"),
    ("truncate", 61, "truncated"),
    ("forge", 80, "forged_checkpoint"),
])
def test_keel_audit_verify_names_the_first_bad_seq_of_a_tampered_export(
        world: World, tmp_path: Path, tamper: str, seq: int, kind: str) -> None:
    env, chained = trust_env(world.settings, world.trust), world.audits
    anchors = tmp_path / "anchors.jsonl"  # kept outside the system
    export_audit(TenantAudit("acme", [], chained["acme"].checkpoints), anchors)
    records = list(chained["acme"].records)
    checkpoints = list(chained["acme"].checkpoints)
    if tamper == "edit":
        records[6] = records[6].replace(b"lead-ann", b"lead-bob")
    elif tamper == "reorder":
        records[6], records[7] = records[7], records[6]
    elif tamper == "delete":
        del records[6]
    elif tamper == "truncate":
        records = records[:60]
    else:
        doc = json.loads(checkpoints[-1].to_json())
        doc["hash"] = "00" * 32
        anchors.write_text(json.dumps(doc) + "\n")
    bad = tmp_path / "bad.jsonl"
    export_audit(TenantAudit("acme", records, checkpoints if tamper != "truncate" else []), bad)

    result = subprocess.run([*CLI, "audit", "verify", "--tenant", "acme", "--records", str(bad),
                             "--from-checkpoint", str(anchors)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"seq={seq} kind={kind}" in result.stdout


def test_keel_audit_verify_and_show_on_kafka(world: World) -> None:
    env = trust_env(world.settings, world.trust)
    ok = subprocess.run([*CLI, "audit", "verify", "--tenant", "globex"], env=env, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK (unanchored) tenant=globex records=20 ")  # Kafka's checkpoints can be cut too
    assert "a truncated tail cannot be detected without --from-checkpoint" in ok.stdout
    shown = subprocess.run([*CLI, "audit", "show", "--tenant", "globex", "--subject", "cust-2"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.strip().splitlines()
    assert len(lines) == 4
    assert "agent:support-bot on behalf of cust-2 via human:lead-ann (customer called)" in lines[0]
    assert "role=" in lines[0] and "SubscriptionStarted sub-2 v1" in lines[0]
    assert "CommandRejected" in lines[2] and "undoes earlier actions" not in lines[3]  # a cancel is an action
    cause = lines[1].rsplit("caused by ", 1)[1].rstrip(")")  # the refund command
    by_command = subprocess.run([*CLI, "audit", "show", "--tenant", "globex", "--command", cause],
                                env=env, capture_output=True, text=True, timeout=60)
    assert by_command.stdout.strip().splitlines() == [lines[1]] and "RefundIssued" in lines[1]


def keel(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)


def test_keel_audit_verify_says_plain_ok_only_when_a_checkpoint_kept_outside_covers_the_head(
        world: World, tmp_path: Path) -> None:
    env, export = trust_env(world.settings, world.trust), tmp_path / "globex.jsonl"
    assert keel(env, "audit", "export", "--tenant", "globex", "--out", str(export)).returncode == 0
    anchored = keel(env, "audit", "verify", "--tenant", "globex", "--from-checkpoint", str(export))
    assert anchored.returncode == 0, anchored.stdout + anchored.stderr
    assert anchored.stdout.startswith("OK tenant=globex records=20 ") and " anchored=20 " in anchored.stdout

    stripped = tmp_path / "stripped.jsonl"  # an export whose checkpoints were removed
    stripped.write_text("".join(line + "\n" for line in export.read_text().splitlines() if '"record"' in line))
    alone = keel(env, "audit", "verify", "--tenant", "globex", "--records", str(stripped))
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert alone.stdout.startswith("OK (unanchored) tenant=globex records=20 checkpoints=0 anchored=0 ")
    assert "no signed checkpoint at all" in alone.stdout and "a truncated tail" in alone.stdout


def test_keel_audit_verify_of_an_unknown_tenant_says_nothing_was_verified_and_exits_3(world: World) -> None:
    result = keel(trust_env(world.settings, world.trust), "audit", "verify", "--tenant", "nobody")
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("NOTHING tenant=nobody: no audit records")


def test_keel_audit_export_into_a_directory_is_a_typed_error(world: World, tmp_path: Path) -> None:
    result = keel(trust_env(world.settings, world.trust), "audit", "export", "--tenant", "globex", "--out",
                  str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == f"error [file_unwritable] {tmp_path}: Is a directory"
