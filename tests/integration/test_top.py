"""``keel top --once`` against real services: the figures it prints are the commands that were sent.

A processor, a relay and the approval watcher run as ``keel`` processes on this test's
topics and a data dir of its own, each publishing its metrics target. Commands of two
tenants go through the SDK (one accepted refund, one refused, one cancel parked for an
approval) with a dead letter beside them. ``keel top --once`` then runs as a process at 80
columns, with ``TERM=xterm`` and ``NO_COLOR``, as over SSH: its rows must show those
decisions per tenant, the waiting approval and the dead letter, and no line may be wider
than 80. A relay killed without a clean exit must then show as down, not end the view.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from keel.bootstrap import ensure_local_keys
from keel.config import Settings
from keel.domain.commands import SetPolicy
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.kafka.clients import producer_config
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from support_desk.messages import CancelSubscription
from tests.helpers import command, refund, send, start
from tests.processes import KeelProcess, keel_env, running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POLICY = {"version": "top-1",
          "roles": {"support-agent": ["StartSubscription", "IssueRefund", "CancelSubscription"]},
          "grants": {"agent:support-bot": ["support-agent"]},
          "rules": [{"name": "cancels-need-approval", "decision": "approve",
                     "match": {"command_types": ["CancelSubscription"]}}]}
SERVICES = {"processor": ["process", "--no-supervise", "--instance", "t1"], "relay": ["relay", "--no-track"],
            "approval-watcher": ["watch", "approvals"]}
SSH = {"COLUMNS": "80", "LINES": "50", "TERM": "xterm", "NO_COLOR": "1"}


@pytest.fixture
def own_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test's topics with a data dir of its own: only its services' targets are published there."""
    return settings.model_copy(update={"data_dir": tmp_path / "data"})


@pytest.fixture
def services(own_settings: Settings, tmp_path: Path) -> Iterator[dict[str, KeelProcess]]:
    ensure_local_keys(own_settings)
    dsn = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    OutboxStore(open_database(dsn)).migrate()
    env = {"KEEL_OUTBOX_DSN": dsn, "KEEL_METRICS_TENANTS": "acme,globex", "KEEL_METRICS_LAG_INTERVAL_MS": "1000",
           "KEEL_APPROVALS_TICK_S": "0.5"}
    with running(SERVICES, own_settings, tmp_path, **env) as processes:
        yield processes


def top(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``keel top --once`` as a process, in an 80-column xterm without colour."""
    return subprocess.run([sys.executable, "-m", "keel.cli", "top", "--once", "--interval", "0.5", *args],
                          env=keel_env(settings, **SSH), capture_output=True, text=True, timeout=60)


def frame_until(settings: Settings, expected: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
    """``keel top --once --json`` until its figures include ``expected`` (summarised by ``figures``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = top(settings, "--json")
        document: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
        seen = figures(document)
        if all(seen.get(key) == value for key, value in expected.items()):
            return document
        assert time.monotonic() < deadline, f"keel top shows {seen}, not {expected}:\n{done.stderr[-2000:]}"
        time.sleep(1)


def figures(document: dict[str, Any]) -> dict[str, Any]:
    tenants = {row["tenant"]: row for row in document.get("tenants", [])}
    return {"up": sorted(row["service"] for row in document.get("services", []) if row["up"]),
            "acme": _decisions(tenants.get("acme")), "globex": _decisions(tenants.get("globex")),
            "dead": document.get("dead_letters"),
            "lag": [row["lag"] for row in document.get("services", []) if row["service"] == "processor"]}


def _decisions(row: dict[str, Any] | None) -> tuple[float, ...] | None:
    return None if row is None else (row["accepted"], row["rejected"], row["parked"], row["waiting"])


def test_keel_top_shows_what_was_sent_at_80_columns_and_a_dead_service_as_down(
        own_settings: Settings, services: dict[str, KeelProcess]) -> None:
    send(own_settings, command("acme", "controls", SetPolicy(document=json.dumps(POLICY)), actor=SYSTEM_ACTOR))
    # a policy holds from the batch after its own: decided first, then the commands it governs
    frame_until(own_settings, {"acme": (1.0, 0.0, 0.0, 0.0)})
    send(own_settings, command("acme", "sub-1", start()), command("acme", "sub-1", refund(2000)),
         command("acme", "sub-1", refund(9000)), command("acme", "sub-2", start()),
         command("acme", "sub-2", CancelSubscription(reason="too expensive")),
         command("globex", "sub-1", start(100, "USD")), command("globex", "sub-1", refund(100, "USD")))
    producer = Producer(producer_config(own_settings))
    producer.produce(topic_name(own_settings, Topic.COMMANDS), b"\x00not avro at all", b"acme/sub-9")
    assert producer.flush(10) == 0

    # acme: the policy, two starts and a refund accepted; the refund past what was paid refused; the cancel parked
    frame_until(own_settings, {"up": sorted(SERVICES), "acme": (4.0, 1.0, 1.0, 1.0), "globex": (2.0, 0.0, 0.0, 0.0),
                               "dead": {"undecodable": 1.0}, "lag": [0.0]})

    shown = top(own_settings)
    print(shown.stdout)  # shown with a failure
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, shown.stdout
    assert "\x1b[" not in shown.stdout and "…" not in shown.stdout
    rows = {line.split()[0]: line.split() for line in lines if line.strip()}
    assert rows["acme"][2:] == ["4", "1", "1", "1", rows["acme"][-1]] and rows["acme"][-1].endswith("s")
    assert rows["globex"][2:] == ["2", "0", "0", "0", "-"]
    for service, instance in (("processor", "t1"), ("relay", "0"), ("approval-watcher", "0")):
        assert rows[service][1:3] == [instance, "up"], shown.stdout
    assert rows["processor"][4:] == ["commands", "0"]  # rate over the last interval, then what and the lag
    assert "3/3 up" in shown.stdout
    assert "1 (undecodable 1)" in shown.stdout and "1 waiting" in shown.stdout

    services["relay"].kill()  # no clean exit: its target stays published, and nothing answers there
    down = top(own_settings)
    print(down.stdout)
    assert down.returncode == 1, down.stdout + down.stderr
    rows = {line.split()[0]: line.split() for line in down.stdout.splitlines() if line.strip()}
    assert rows["relay"][1:4] == ["0", "DOWN", "-"] and rows["relay"][4] == "refused", down.stdout
    assert rows["acme"][2:6] == ["4", "1", "1", "1"] and "2/3 up" in down.stdout
