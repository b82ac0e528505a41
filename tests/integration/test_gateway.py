"""The HTTP gateway in-process (real SQLite outbox): acceptance, idempotency, every refusal."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from keel.config import Settings
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.domain.envelope import Actor, ActorKind
from keel.gateway.app import create_app
from keel.gateway.settings import IngressSettings
from keel.outbox.db import open_database
from keel.outbox.models import CommandStatus, Outcome
from keel.outbox.store import OutboxStore
from keel.security.keys import KeyStore

pytestmark = pytest.mark.integration

BOT = Actor(kind=ActorKind.AGENT, id="support-bot")


@dataclass
class Harness:
    client: TestClient
    store: OutboxStore
    keys: KeyStore
    acme: dict[str, str]
    globex: dict[str, str]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def build(dsn: str, tmp_path: Path, base: Settings, **ingress: Any) -> Iterator[Harness]:
    settings = base.model_copy(update={"data_dir": tmp_path})  # this test's topics, no shared keys
    db = open_database(dsn)
    store, keys = OutboxStore(db), KeyStore(db)
    store.migrate()
    for tenant in ("acme", "globex"):
        keys.create_tenant(tenant)
    _, acme = keys.create_key("acme", BOT, frozenset({"support-agent"}))
    _, globex = keys.create_key("globex", BOT)
    app = create_app(settings, IngressSettings(outbox_dsn=dsn, **ingress))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Harness(client, store, keys, bearer(acme), bearer(globex))
    db.close()


@pytest.fixture
def gw(tmp_path: Path, settings: Settings) -> Iterator[Harness]:
    yield from build(f"sqlite:///{tmp_path / 'outbox.sqlite3'}", tmp_path, settings, gateway_key_cache_s=0,
                     gateway_max_body_bytes=4096)


def body(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": str(uuid.uuid4()), "type": "IssueRefund", "aggregate_id": "sub-1",
        "payload": {"amount_cents": 500, "currency": "EUR", "reason": "late delivery"},
    }
    return {**base, **overrides}


def error_of(response: Any) -> dict[str, Any]:
    return response.json()["error"]  # type: ignore[no-any-return]


def test_a_command_is_accepted_durably_and_readable_by_its_tenant_only(gw: Harness) -> None:
    sent = body()
    response = gw.client.post("/v1/commands", json=sent, headers=gw.acme)
    assert response.status_code == 202
    assert response.json()["command_id"] == sent["id"] and response.json()["status"] == "accepted"
    [row] = gw.store.unsent(10)
    assert row.key == "acme/sub-1" and str(row.command_id) == sent["id"]
    status = gw.client.get(f"/v1/commands/{sent['id']}", headers=gw.acme)
    assert status.status_code == 200 and status.json()["status"] == "accepted"
    assert gw.client.get(f"/v1/commands/{sent['id']}", headers=gw.globex).status_code == 404


def test_the_same_id_and_body_again_returns_the_original_result(gw: Harness) -> None:
    sent = body()
    first = gw.client.post("/v1/commands", json=sent, headers=gw.acme)
    gw.store.mark_published([uuid.UUID(sent["id"])])
    again = gw.client.post("/v1/commands", json=sent, headers=gw.acme)
    assert again.status_code == 202
    assert again.json() == {**first.json(), "status": "published", "replayed": True}
    assert len(gw.store.unsent(10)) == 0


def test_a_replayed_id_with_a_different_body_is_refused_and_recorded(gw: Harness) -> None:
    sent = body()
    gw.client.post("/v1/commands", json=sent, headers=gw.acme)
    changed = gw.client.post("/v1/commands", json={**sent, "aggregate_id": "sub-2"}, headers=gw.acme)
    assert changed.status_code == 409
    assert error_of(changed)["code"] == "idempotency_conflict" and error_of(changed)["field"] == "id"
    assert [r["code"] for r in gw.store.rejections("acme")] == ["idempotency_conflict"]


def test_command_for_other_tenant_is_rejected_and_audited(gw: Harness) -> None:
    response = gw.client.post("/v1/commands", json=body(tenant_id="globex"), headers=gw.acme)
    assert response.status_code == 403
    assert error_of(response)["code"] == "wrong_tenant" and error_of(response)["field"] == "tenant_id"
    [recorded] = gw.store.rejections("acme")
    assert recorded["claimed_tenant"] == "globex" and recorded["actor"] == "agent:support-bot"
    assert gw.store.unsent(10) == []


def test_an_isolation_violation_reaches_the_offenders_and_the_targets_audit_chains(
        gw: Harness, settings: Settings) -> None:
    gw.client.post("/v1/commands", json=body(tenant_id="globex"), headers=gw.acme)  # a registered target
    gw.client.post("/v1/commands", json=body(tenant_id="initech"), headers=gw.acme)  # a made-up one
    deadline = time.monotonic() + 20
    while True:
        intake = [(m.key(), m.value() or b"") for m in read_to_end(settings, topic_name(settings, Topic.AUDIT_INTAKE))]
        if len(intake) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(cast(bytes, key) for key, _ in intake) == [b"acme", b"acme", b"globex"]  # no chain for initech
    assert all(b"IsolationViolation" in value for _, value in intake)
    [(_, targeted)] = [(k, v) for k, v in intake if k == b"globex"]
    assert b'"offender_tenant":"acme"' in targeted.replace(b" ", b"")


def test_a_query_reaching_outside_the_tenants_projections_is_a_security_event_in_its_chain(
        gw: Harness, settings: Settings, migrated: Client) -> None:  # the projections exist: the guard decides
    _, token = gw.keys.create_key("acme", Actor(kind=ActorKind.HUMAN, id="ann"), frozenset({"analyst"}))
    answer = gw.client.get("/v1/query", params={"sql": "SELECT * FROM system.tables"}, headers=bearer(token))
    assert answer.status_code == 400 and error_of(answer)["code"] == "table_not_allowed"
    deadline = time.monotonic() + 20
    while not (intake := list(read_to_end(settings, topic_name(settings, Topic.AUDIT_INTAKE)))):
        assert time.monotonic() < deadline, "no security event reached the audit intake"
        time.sleep(0.5)
    [record] = intake
    assert record.key() == b"acme" and b"ReadRefused" in (record.value() or b"")


def test_the_tenant_and_actor_come_from_the_key(gw: Harness) -> None:
    same = gw.client.post("/v1/commands", json=body(tenant_id="acme", actor={"kind": "agent", "id": "support-bot"}),
                          headers=gw.acme)
    other = gw.client.post("/v1/commands", json=body(actor={"kind": "human", "id": "ceo"}), headers=gw.acme)
    assert same.status_code == 202
    assert other.status_code == 403 and error_of(other)["code"] == "wrong_actor"
    assert [r["code"] for r in gw.store.rejections("acme")] == ["wrong_actor"]


@pytest.mark.parametrize(("headers", "code"), [
    ({}, "missing_key"),
    ({"Authorization": "Bearer keel_0123456789abcdef_" + "x" * 43}, "invalid_key"),
    ({"Authorization": "Bearer not-a-key"}, "invalid_key"),
])
def test_a_missing_or_invalid_key_is_401(gw: Harness, headers: dict[str, str], code: str) -> None:
    response = gw.client.post("/v1/commands", json=body(), headers=headers)
    assert response.status_code == 401 and error_of(response)["code"] == code
    assert gw.store.unsent(10) == []


def test_a_revoked_key_is_refused(gw: Harness) -> None:
    key, token = gw.keys.create_key("acme", BOT)
    assert gw.client.post("/v1/commands", json=body(), headers=bearer(token)).status_code == 202
    assert gw.keys.revoke(key.key_id)
    assert gw.client.post("/v1/commands", json=body(), headers=bearer(token)).status_code == 401


@pytest.mark.parametrize(("raw", "status", "code", "field"), [
    (b'{"type": "IssueRefund",', 400, "malformed_json", ""),
    (b"[1, 2]", 422, "schema_violation", ""),
    (json.dumps(body(type="LaunchMissiles", payload={})).encode(), 422, "unknown_type", "type"),
    (json.dumps(body(payload={"amount_cents": -5, "currency": "EUR", "reason": "x"})).encode(), 422,
     "schema_violation", "payload.amount_cents"),
    (json.dumps(body(id="not-a-uuid")).encode(), 422, "schema_violation", "id"),
    (json.dumps(body(type="RefundIssued")).encode(), 422, "not_a_command", "type"),
    (json.dumps(body(occurred_at="2020-01-01T00:00:00+00:00")).encode(), 422, "beyond_dedupe_window",
     "occurred_at"),
    (json.dumps(body(payload={"amount_cents": 1, "currency": "EUR", "reason": "x" * 5000})).encode(), 413,
     "payload_too_large", ""),
])
def test_bad_input_gets_a_precise_4xx_and_never_reaches_the_outbox(
        gw: Harness, raw: bytes, status: int, code: str, field: str) -> None:
    response = gw.client.post("/v1/commands", content=raw,
                              headers={**gw.acme, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code and error_of(response)["field"] == field
    assert error_of(response)["message"]
    assert gw.store.unsent(10) == []


def test_a_non_json_content_type_is_415(gw: Harness) -> None:
    response = gw.client.post("/v1/commands", content=b"x", headers={**gw.acme, "Content-Type": "text/plain"})
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"


def test_bad_requests_do_not_affect_good_ones_in_between(gw: Harness) -> None:
    good = [body() for _ in range(5)]
    for sent in good:
        assert gw.client.post("/v1/commands", content=b"{", headers={**gw.acme, "Content-Type": "application/json"}
                              ).status_code == 400
        assert gw.client.post("/v1/commands", json=sent, headers=gw.acme).status_code == 202
    assert [str(r.command_id) for r in gw.store.unsent(10)] == [s["id"] for s in good]


def test_a_bad_path_id_is_a_422_naming_the_field(gw: Harness) -> None:
    response = gw.client.get("/v1/commands/nope", headers=gw.acme)
    assert response.status_code == 422 and error_of(response)["field"] == "path.command_id"


def test_the_stream_follows_status_changes_until_the_final_one(gw: Harness) -> None:
    sent = body()
    gw.client.post("/v1/commands", json=sent, headers=gw.acme)
    command_id = uuid.UUID(sent["id"])

    def progress() -> None:
        time.sleep(0.4)
        gw.store.mark_published([command_id])
        time.sleep(0.4)
        gw.store.apply_outcomes([Outcome(command_id=command_id, status=CommandStatus.REJECTED,
                                         reason_code="refund_exceeds_paid", reason="nothing was paid")])

    threading.Thread(target=progress).start()
    with gw.client.stream("GET", f"/v1/commands/{sent['id']}/stream?timeout_s=10", headers=gw.acme) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        statuses = [json.loads(line[5:])["status"] for line in stream.iter_lines() if line.startswith("data:")]
    assert statuses == ["accepted", "published", "rejected"]


def test_the_openapi_document_describes_the_endpoints_and_errors(gw: Harness) -> None:
    document = gw.client.get("/openapi.json").json()
    post = document["paths"]["/v1/commands"]["post"]
    assert {"202", "401", "403", "409", "413", "422"} <= set(post["responses"])
    assert "aggregate_id" in document["components"]["schemas"]["IssueRefundRequest"]["required"]
    assert "Actor" in document["components"]["schemas"]
    assert gw.client.get("/docs").status_code == 200


def test_the_query_api_is_served_by_the_gateway_for_analysts_only(gw: Harness) -> None:
    response = gw.client.get("/v1/query", params={"sql": "SELECT count() FROM events"}, headers=gw.acme)
    assert response.status_code == 403  # the acme key holds support-agent, not analyst
    assert "/v1/query" in gw.client.get("/openapi.json").json()["paths"]
