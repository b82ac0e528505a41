"""Prometheus metrics against a real Prometheus: Debian's ``prometheus`` scrapes running Keel services.

The relay, a processor, the chainer, an effect worker, the projector and the approval
watcher run as real ``keel`` processes on this test's topics and data dir; each serves
``/metrics`` on a free port and publishes it for file_sd. Prometheus runs with the shipped
``infra/prometheus/prometheus.yml`` and alert rules, laid out beside a ``.keel`` data dir as
in the repository, unchanged but for 1 s intervals. The test drives commands through the outbox
and the SDK, then asks Prometheus's HTTP API for the series and compares them with what
was sent and with what the topics hold. ``promtool`` checks the shipped config and rules.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from confluent_kafka import Producer

from keel.bootstrap import ensure_local_keys
from keel.config import PROJECT_ROOT, Settings
from keel.domain.commands import SetPolicy
from keel.domain.governance.policy import SYSTEM_ACTOR
from keel.kafka.clients import producer_config
from keel.kafka.topics import Topic, topic_name
from keel.observability import exporter
from keel.outbox.db import open_database
from keel.outbox.enqueue import enqueue
from keel.outbox.store import OutboxStore
from keel.testing.provider import ProviderSimulator
from support_desk.messages import CancelSubscription
from tests.broker_faults import free_port
from tests.helpers import command, events, outbox_with_agent_key, refund, send, start
from tests.processes import KeelProcess, running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

INFRA = PROJECT_ROOT / "infra" / "prometheus"
SERVICES = {"relay": ["relay", "--no-track"], "processor": ["process", "--no-supervise", "--instance", "m1"],
            "chainer": ["chain", "--no-supervise", "--instance", "m1"],
            "effects": ["effects", "run", "--no-supervise", "--instance", "m1"],
            "projector": ["project", "--follow"], "approval-watcher": ["watch", "approvals"]}
POLICY = {"version": "metrics-1",
          "roles": {"support-agent": ["StartSubscription", "IssueRefund", "CancelSubscription"]},
          "grants": {"agent:support-bot": ["support-agent"]},
          "rules": [{"name": "cancels-need-approval", "decision": "approve",
                     "match": {"command_types": ["CancelSubscription"]}}]}


def _binary(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is not installed (Debian's prometheus package; .ci/run installs it)"
    return found


def test_promtool_accepts_the_shipped_rules_config_and_alert_tests() -> None:
    promtool = _binary("promtool")
    rules = subprocess.run([promtool, "check", "rules", str(INFRA / "alerts.yml")], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 8 rules found" in rules.stdout
    config = subprocess.run([promtool, "check", "config", str(INFRA / "prometheus.yml")],
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr
    # the required alerts fire on the series that should raise them, and only then
    fired = subprocess.run([promtool, "test", "rules", str(INFRA / "alerts_test.yml")], capture_output=True,
                           text=True)
    assert fired.returncode == 0, fired.stdout + fired.stderr


def test_an_exporter_serves_metrics_and_publishes_its_address_for_file_sd(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, topic_prefix="solo")
    assert exporter.start(settings.model_copy(update={"metrics_enabled": False}), "relay") is None
    assert not exporter.targets_dir(settings).exists()  # the off switch publishes nothing
    target = exporter.start(settings, "relay", "r9")
    assert target is not None
    [group] = json.loads(target.path.read_text())
    assert group["targets"] == [target.address] and group["labels"]["service"] == "relay"
    assert exporter.published(settings) == [target]
    body = httpx.get(target.url, timeout=5).text
    assert "# TYPE keel_outbox_published_total counter" in body


@dataclass
class Prometheus:
    url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        assert len(result) <= 1, f"{promql} has several series: {result}"
        return float(result[0]["value"][1]) if result else None

    def eventually(self, promql: str, expected: Callable[[float | None], bool], what: str,
                   timeout_s: float = 90) -> float | None:
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self.value(promql)
            if expected(seen):
                return seen
            assert time.monotonic() < deadline, f"{what}: `{promql}` is {seen}"
            time.sleep(1)


@pytest.fixture
def prometheus(tmp_path: Path, own_settings: Settings) -> Iterator[Prometheus]:
    """Debian's prometheus with the shipped scrape config and rules, laid out as in the repository
    beside this test's ``.keel`` data dir: the shipped file_sd glob finds the services unchanged.
    Only the intervals are shortened (1 s instead of 15 s and 30 s)."""
    assert own_settings.data_dir == tmp_path / ".keel"
    config = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    [job] = config["scrape_configs"]
    job["file_sd_configs"][0]["refresh_interval"] = "1s"
    path = tmp_path / "infra" / "prometheus" / "prometheus.yml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))
    for rules in config["rule_files"]:
        shutil.copy(INFRA / rules, path.parent / rules)
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen([_binary("prometheus"), f"--config.file={path}",
                                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _ready(url):
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus did not get ready"
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def own_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test's topics with a data dir (keys, outbox, chDB, metrics targets) of its own, named as
    ``keel dev``'s default (``<repository>/.keel``) so that the shipped scrape config finds it."""
    return settings.model_copy(update={"data_dir": tmp_path / ".keel"})


@pytest.fixture
def services(own_settings: Settings, tmp_path: Path) -> Iterator[dict[str, KeelProcess]]:
    ensure_local_keys(own_settings)
    dsn = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    OutboxStore(open_database(dsn)).migrate()
    send(own_settings, command("acme", "controls", SetPolicy(document=json.dumps(POLICY)), actor=SYSTEM_ACTOR))
    with ProviderSimulator() as provider:
        env = {"KEEL_OUTBOX_DSN": dsn, "KEEL_METRICS_TENANTS": "acme", "KEEL_APPROVALS_TICK_S": "0.5",
               "SUPPORT_DESK_PAYMENTS_URL": provider.url, "SUPPORT_DESK_EMAIL_URL": provider.url}
        with running(SERVICES, own_settings, tmp_path, **env) as processes:
            yield processes


def _through_outbox(dsn_path: Path, *commands: Any) -> None:
    with sqlite3.connect(dsn_path) as connection:
        for cmd in commands:
            enqueue(connection, cmd)


def test_prometheus_scrapes_every_service_and_its_series_match_what_was_sent(
        own_settings: Settings, services: dict[str, KeelProcess], prometheus: Prometheus, tmp_path: Path) -> None:
    prometheus.eventually('count(up{job="keel"} == 1)', lambda v: v == len(SERVICES),
                          "every service scraped and up", timeout_s=120)
    assert {r["metric"]["service"] for r in prometheus.query('up{job="keel"}')} == set(SERVICES)

    send(own_settings, command("acme", "sub-1", start()), command("acme", "sub-1", refund(2000)),
         command("acme", "sub-1", refund(9000)), command("acme", "sub-2", start()),
         command("acme", "sub-2", CancelSubscription(reason="too expensive")),
         command("globex", "sub-1", start(100, "USD")), command("globex", "sub-1", refund(100, "USD")))
    _through_outbox(tmp_path / "outbox.sqlite3", command("acme", "sub-3", start()),
                    command("acme", "sub-4", start()), command("globex", "sub-2", start()))
    producer = Producer(producer_config(own_settings))
    producer.produce(topic_name(own_settings, Topic.COMMANDS), b"\x00not avro at all", b"acme/sub-9")
    assert producer.flush(10) == 0

    # Each refund's effect settles (its outcome is one more command of its tenant); then the numbers hold still.
    prometheus.eventually('sum(keel_effect_outcomes_total{outcome="succeeded"})', lambda v: v == 2,
                          "both refunds' effects succeeded")
    assert prometheus.value('keel_effect_outcomes_total{tenant="acme",provider="payments",outcome="succeeded"}') == 1
    settled = {"acme": 1, "globex": 1}  # one refund each: one effect, one outcome command
    deadline = time.monotonic() + 60
    while {t: sum(e.tenant_id == t and e.type == "EffectSucceeded" for e in events(own_settings))
           for t in settled} != settled:  # the outcome commands decided too
        assert time.monotonic() < deadline, "the effects' outcomes were not recorded"
        time.sleep(1)
    accepted = 1 + 1 + 1 + 1 + 2 + settled["acme"]  # policy, sub-1 start, refund, sub-2 start, outbox, outcome
    decided = 'sum(keel_decisions_total{{tenant="{tenant}",outcome="{outcome}"}})'
    prometheus.eventually(decided.format(tenant="acme", outcome="accepted"), lambda v: v == accepted,
                          "acme's accepted decisions")
    prometheus.eventually('keel_decisions_total{tenant="acme",outcome="rejected",code="refund_exceeds_paid"}',
                          lambda v: v == 1, "the rejected refund")
    prometheus.eventually(decided.format(tenant="acme", outcome="pending"), lambda v: v == 1, "the paused cancel")
    # globex is not on KEEL_METRICS_TENANTS: it counts as `other`, and never names a series
    others = 3 + settled["globex"]  # two starts (one through the outbox), a refund, its outcome
    prometheus.eventually(decided.format(tenant="other", outcome="accepted"), lambda v: v == others,
                          "globex's decisions under `other`")
    assert prometheus.query('{tenant="globex"}') == []
    prometheus.eventually("sum(keel_commands_received_total)", lambda v: v == accepted + 1 + 1 + others,
                          "every command received once")  # + the rejected one and the pending one
    prometheus.eventually('keel_dead_letters_total{code="undecodable"}', lambda v: v == 1, "the dead letter")
    assert prometheus.value("sum(keel_outbox_published_total)") == 3

    acme_events = [e for e in events(own_settings) if e.tenant_id == "acme"]
    every_event = len(events(own_settings))
    prometheus.eventually('keel_audit_chain_head{tenant="acme"}', lambda v: v == len(acme_events),
                          "the acme chain's head at its last event")
    prometheus.eventually('keel_audit_checkpoint_age_seconds{tenant="acme"}', lambda v: v == 0,
                          "the acme head signed")
    assert (prometheus.value("sum(keel_audit_checkpoints_total)") or 0) >= 1
    prometheus.eventually('keel_projected_rows_total{table="events"}', lambda v: v == every_event,
                          "every event projected")
    prometheus.eventually('keel_projection_lag_seconds{table="events"}', lambda v: v == 0, "the projector caught up")
    prometheus.eventually('keel_approvals_pending{tenant="acme"}', lambda v: v == 1, "the cancel waits for approval")
    assert (prometheus.value('keel_approvals_oldest_pending_age_seconds{tenant="acme"}') or 0) > 0
    assert prometheus.value('sum(keel_approvals_overdue)') == 0

    group = f'group="{own_settings.topic_prefix}.processor"'
    prometheus.eventually(f"count(keel_consumer_lag_records{{{group}}})", lambda v: v == own_settings.topic_partitions,
                          "the processor's lag on each partition")
    prometheus.eventually(f"sum(keel_consumer_lag_records{{{group}}})", lambda v: v == 0, "no processor lag")
    assert (prometheus.value('sum(keel_batch_records_count{loop="processor"})') or 0) >= 1
    assert (prometheus.value('sum(keel_transactions_total{loop="chainer",outcome="committed"})') or 0) >= 1
    assert (prometheus.value('sum(keel_transaction_commit_duration_seconds_count{loop="processor"})') or 0) >= 1
    assert prometheus.value("sum(keel_outbox_lease_held)") == 1
    assert [r["labels"]["alertname"] for r in _firing(prometheus)] == []


def _firing(prometheus: Prometheus) -> list[dict[str, Any]]:
    alerts = httpx.get(f"{prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a for a in alerts if a["state"] == "firing"]


def _rule_state(prometheus: Prometheus, name: str) -> str:
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    [rule] = [r for g in groups for r in g["rules"] if r["name"] == name]
    return str(rule["state"])


def test_a_service_that_dies_is_down_for_prometheus(
        own_settings: Settings, prometheus: Prometheus, tmp_path: Path) -> None:
    relay = KeelProcess(["relay", "--no-track"], own_settings, tmp_path / "relay.log",
                        KEEL_OUTBOX_DSN=f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    relay.start()
    try:
        prometheus.eventually('up{job="keel",service="relay"}', lambda v: v == 1, "the relay scraped")
        relay.kill()  # no clean exit: its target stays published
        prometheus.eventually('up{job="keel",service="relay"}', lambda v: v == 0, "the killed relay down")
        deadline = time.monotonic() + 30
        while _rule_state(prometheus, "KeelServiceDown") not in ("pending", "firing"):  # `for: 1m`, then firing
            assert time.monotonic() < deadline, "KeelServiceDown did not go pending for the killed relay"
            time.sleep(0.5)
        relay.start()  # back under the same instance label, on a new port
        prometheus.eventually('up{job="keel",service="relay"}', lambda v: v == 1, "the restarted relay scraped")
        assert len(prometheus.query('up{job="keel",service="relay"}')) == 1
        relay.stop()  # a clean exit withdraws its target
        assert exporter.published(own_settings) == []
    finally:
        relay.stop()



def test_the_gateway_wired_as_docs_say_counts_submits_by_status(settings: Settings, tmp_path: Path) -> None:
    """``create_app``'s front wrapped in ``Metered`` with ``GET /metrics`` (the lines app.py takes):
    the fast path's ``POST /v1/commands`` is counted, by status, under its route."""
    from fastapi.testclient import TestClient

    from keel.gateway.app import create_app
    from keel.gateway.settings import IngressSettings
    from keel.observability.http import Metered, add_metrics_route

    dsn = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    token = outbox_with_agent_key(dsn)
    front = create_app(settings.model_copy(update={"data_dir": tmp_path}),
                       IngressSettings(outbox_dsn=dsn, gateway_key_cache_s=0))
    add_metrics_route(front.app)
    body = {"id": "", "type": "IssueRefund", "aggregate_id": "sub-1",
            "payload": {"amount_cents": 500, "currency": "EUR", "reason": "late"}}
    with TestClient(Metered(front), raise_server_exceptions=False) as client:
        for _ in range(2):
            accepted = client.post("/v1/commands", json={**body, "id": str(uuid.uuid4())},
                                   headers={"Authorization": f"Bearer {token}"})
            assert accepted.status_code == 202, accepted.text
        assert client.post("/v1/commands", json=body).status_code == 401
        exposed = client.get("/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in exposed.splitlines()
               if line.startswith("keel_gateway_requests_total{")}
    assert samples['keel_gateway_requests_total{method="POST",route="/v1/commands",status="202"}'] >= 2
    assert samples['keel_gateway_requests_total{method="POST",route="/v1/commands",status="401"}'] >= 1
