"""``keel effects list|show|retry|cancel`` as an operator runs them, against real processes: the
relay's status tracker fills the store, a processor worker decides the operator's commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from keel.config import Settings
from keel.domain.commands import FailEffect
from keel.domain.effects import outcome_command_id
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.domain.outcomes import event_id
from keel.effects.progress import EffectReport, EffectState
from keel.effects.status import EffectRecord
from keel.kafka.clients import producer_config
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from tests.helpers import command, refund, send, start
from tests.processes import KeelProcess, keel_env

pytestmark = pytest.mark.integration


class Operator:
    """The test's `keel` environment, its tracker and processor processes, and the store they fill."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings = settings
        dsn = f"sqlite:///{folder / 'outbox.sqlite3'}"
        self.env = {"KEEL_OUTBOX_DSN": dsn, "COLUMNS": "250"}
        self.processes = [KeelProcess(["relay"], settings, folder / "relay.log", **self.env),
                          KeelProcess(["process", "--no-supervise", "--instance", f"fx-{uuid.uuid4().hex[:8]}"],
                                      settings, folder / "processor.log", **self.env)]
        for process in self.processes:
            process.start()
        self.store = OutboxStore(open_database(dsn))
        self.store.migrate()

    def keel(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "keel.cli", *args], env=keel_env(self.settings, **self.env),
                              text=True, capture_output=True, timeout=120, check=False)
        assert (done.returncode == 0) is ok, f"`keel {' '.join(args)}`:\n{done.stdout}\n{done.stderr}"
        return done

    def effect(self, effect_id: uuid.UUID, until: Callable[[EffectRecord], bool], what: str) -> EffectRecord:
        deadline = time.monotonic() + 60
        while True:
            found = self.store.effect("acme", effect_id)
            if found is not None and until(found):
                return found
            for process in self.processes:
                process.assert_alive()
            assert time.monotonic() < deadline, f"never: {what}\n" + "\n".join(
                p.output()[-2000:] for p in self.processes)
            time.sleep(0.2)

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        self.store.db.close()


@pytest.fixture
def operator(settings: Settings, tmp_path: Path) -> Iterator[Operator]:
    running = Operator(settings, tmp_path)
    yield running
    running.close()


def test_an_operator_lists_shows_retries_and_cancels_effects(operator: Operator, settings: Settings) -> None:
    paid = command("acme", "sub-1", refund(500))
    send(settings, command("acme", "sub-1", start(5000)), paid)
    effect_id = event_id(paid.id, 0)  # the RefundIssued, whose effect pays the refund out
    opened = operator.effect(effect_id, lambda e: e.event_offset is not None, "the tracker opens the effect")

    [listed] = json.loads(operator.keel("effects", "list", "--tenant", "acme", "--json").stdout)
    assert (listed["effect_id"], listed["state"], listed["event_type"], listed["provider"]) == (
        str(effect_id), "pending", "RefundIssued", "payments")
    refused = operator.keel("effects", "retry", str(effect_id), "--tenant", "acme", "--reason", "x", ok=False)
    assert "[effect_open]" in refused.stderr and "processor decides" in refused.stderr

    # A worker ran it and the provider declined.
    report = EffectReport(tenant_id="acme", effect_id=effect_id, origin_command_id=paid.id, aggregate_id="sub-1",
                          event_type="RefundIssued", provider="payments", generation=0, seq=1,
                          state=EffectState.RUNNING, attempts=1, at=time.time(), worker="w-1")
    producer = Producer(producer_config(settings))
    producer.produce(topic_name(settings, Topic.EFFECTS), key=report.key, value=report.model_dump_json())
    producer.flush(10)
    send(settings, command("acme", "sub-1", FailEffect(effect_id=effect_id, generation=0, provider="payments",
                                                       attempts=1, code="declined", error="card declined"),
                           actor=SYSTEM_ACTOR, command_id=outcome_command_id(effect_id, 0)))
    operator.effect(effect_id, lambda e: e.state is EffectState.FAILED, "the failure is folded")

    table = operator.keel("effects", "list", "--tenant", "acme", "--state", "failed").stdout
    assert str(effect_id) in table and "failed" in table and "RefundIssued" in table
    assert "no failed effects" in operator.keel("effects", "list", "--tenant", "globex", "--state", "failed").stdout
    shown: dict[str, Any] = json.loads(operator.keel("effects", "show", str(effect_id), "--tenant", "acme",
                                                     "--json").stdout)
    assert (shown["state"], shown["error_code"], shown["error"], shown["attempts"]) == (
        "failed", "declined", "card declined", 1)
    assert (shown["event_partition"], shown["event_offset"]) == (opened.event_partition, opened.event_offset)

    # Retried by a person: where its event is comes from the events topic when the store lost it.
    with operator.store.db.transaction() as cursor:
        cursor.execute("UPDATE keel_effects SET event_partition = NULL, event_offset = NULL WHERE effect_id = ?",
                       (str(effect_id),))
    retried = operator.keel("effects", "retry", str(effect_id), "--tenant", "acme", "--reason", "card updated",
                            "--as", "human:olga.ops", "--wait").stdout
    assert "sent RetryEffect" in retried and f'"event_offset":{opened.event_offset}' in retried
    assert "recorded EffectRetried" in retried
    again = operator.effect(effect_id, lambda e: e.generation == 1, "the retry is folded")
    assert (again.state, again.event_partition, again.event_offset) == (
        EffectState.PENDING, opened.event_partition, opened.event_offset)

    cancelled = operator.keel("effects", "cancel", str(effect_id), "--tenant", "acme", "--reason", "customer called",
                              "--as", "human:olga.ops", "--wait").stdout
    assert "sent CancelEffect" in cancelled and "recorded EffectCancelled" in cancelled
    gone = operator.effect(effect_id, lambda e: e.state is EffectState.CANCELLED, "the cancellation is folded")
    assert (gone.error_code, gone.error) == ("cancelled_by_operator", "customer called")

    settled = operator.keel("effects", "cancel", str(effect_id), "--tenant", "acme", "--reason", "again", ok=False)
    assert "[effect_settled]" in settled.stderr
    for tenant, effect in (("acme", str(uuid.uuid4())), ("globex", str(effect_id))):
        unknown = operator.keel("effects", "show", effect, "--tenant", tenant, ok=False)
        assert "[unknown_effect]" in unknown.stderr
