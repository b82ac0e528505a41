"""The keel_* series: batch tallies under bounded labels, gateway request metering, and the
dashboard and alert rules naming only series the services export (keel.observability)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import anyio
import httpx
import pytest
import yaml
from fastapi import FastAPI
from prometheus_client import REGISTRY

import keel.observability.http as gateway_metrics
from keel.config import PROJECT_ROOT
from keel.observability import metrics
from keel.observability.batches import DecisionTally
from keel.observability.tenants import OTHER, TenantLabels

DASHBOARD = PROJECT_ROOT / "infra" / "grafana" / "keel.json"
ALERTS = PROJECT_ROOT / "infra" / "prometheus" / "alerts.yml"
PROMQL_NAMES = re.compile(r"\b(keel_[a-z0-9_]+|up)\b(?!\s*\()")


@pytest.fixture
def labels() -> Iterator[TenantLabels]:
    previous = metrics.TENANTS
    bounded = TenantLabels(top=1)
    metrics.use_tenant_labels(bounded)
    yield bounded
    metrics.use_tenant_labels(previous)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_batch_is_counted_once_under_bounded_labels(labels: TenantLabels) -> None:
    before = {k: value("keel_decisions_total", tenant=k[0], outcome=k[1], code=k[2])
              for k in (("t-a", "accepted", ""), (OTHER, "rejected", "too_big"))}
    other_in = value("keel_commands_received_total", tenant=OTHER)
    dead = value("keel_dead_letters_total", code="malformed")
    tally = DecisionTally()
    for _ in range(3):
        tally.decided("t-a", "accepted", "", 1)
    tally.decided("t-b", "rejected", "too_big", 1)
    tally.decided("t-c", "rejected", "too_big", 1)
    tally.duplicate("t-c")
    tally.dead_letter("malformed")
    tally.flush()
    assert value("keel_decisions_total", tenant="t-a", outcome="accepted", code="") == \
        before["t-a", "accepted", ""] + 3
    assert value("keel_decisions_total", tenant=OTHER, outcome="rejected", code="too_big") == \
        before[OTHER, "rejected", "too_big"] + 2  # t-b and t-c share `other`: top is 1
    assert value("keel_commands_received_total", tenant=OTHER) == other_in + 3
    assert value("keel_dead_letters_total", code="malformed") == dead + 1


def test_a_tenant_that_loses_its_label_loses_its_series(labels: TenantLabels) -> None:
    small = DecisionTally()
    small.decided("t-small", "accepted", "", 0)
    small.flush()
    assert value("keel_commands_received_total", tenant="t-small") > 0
    noisy = DecisionTally()
    for _ in range(10):
        noisy.decided("t-noisy", "accepted", "", 0)
    noisy.flush()
    assert labels.named == frozenset({"t-noisy"})
    assert REGISTRY.get_sample_value("keel_commands_received_total", {"tenant": "t-small"}) is None
    assert value("keel_commands_received_total", tenant="t-noisy") == 10


def test_the_gateway_meter_labels_requests_by_route_template_and_status() -> None:
    anyio.run(_meter_routes)


async def _meter_routes() -> None:
    app = FastAPI()

    @app.get("/v1/commands/{command_id}")
    async def status(command_id: str) -> dict[str, str]:
        return {"id": command_id}

    gateway_metrics.add_metrics_route(app)
    front = gateway_metrics.Metered(app)
    route = {"route": "/v1/commands/{command_id}", "method": "GET", "status": "200"}
    before = value("keel_gateway_requests_total", **route)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://gw") as client:
        for n in range(3):
            assert (await client.get(f"/v1/commands/{n}")).status_code == 200
        assert (await client.get("/nowhere")).status_code == 404
        exposed = (await client.get("/metrics")).text
    assert value("keel_gateway_requests_total", **route) == before + 3
    assert value("keel_gateway_requests_total", route="unmatched", method="GET", status="404") >= 1
    assert 'keel_gateway_requests_total{method="GET",route="/v1/commands/{command_id}",status="200"}' in exposed


def expressions() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load(ALERTS.read_text())
    return {"dashboard": [t["expr"] for p in dashboard["panels"] for t in p["targets"]],
            "alerts": [r["expr"] for g in rules["groups"] for r in g["rules"]]}


def test_the_dashboard_and_the_alerts_name_only_exported_series() -> None:
    exported = metrics.exported_names() | {"up"}
    assert "keel_gateway_requests_total" in exported and "keel_decisions_total" in exported
    for source, exprs in expressions().items():
        assert exprs, source
        named = {name for expr in exprs for name in PROMQL_NAMES.findall(expr)}
        assert named - exported == set(), f"{source} names series no service exports"


def test_the_dashboard_is_a_grafana_dashboard_over_one_prometheus_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["refId"] and t["expr"] for t in panel["targets"])
