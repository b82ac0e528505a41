"""Property: whatever body arrives, the gateway answers 202 or a precise 4xx, never a 5xx."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind
from keel.gateway.app import create_app
from keel.gateway.errors import HTTP_STATUS
from keel.gateway.settings import IngressSettings
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.security.keys import KeyStore

pytestmark = pytest.mark.integration

EXAMPLES = 10_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["id", "tenant_id", "actor", "type", "aggregate_id", "payload", "occurred_at", "correlation_id",
          "expected_version", "delegation", "authority", "on_behalf_of", "traceparent", "schema_version"]
TYPES = ["IssueRefund", "StartSubscription", "CancelSubscription", "SendEmail", "RefundIssued", "Nope", ""]


PAYLOADS: dict[str, dict[str, Any]] = {
    "IssueRefund": {"amount_cents": 500, "currency": "EUR", "reason": "late"},
    "StartSubscription": {"customer_id": "c-1", "plan": "pro", "monthly_price_cents": 900, "currency": "EUR"},
    "CancelSubscription": {"reason": "asked"},
    "SendEmail": {"to_address": "a@example.com", "template": "bye"},
}


@st.composite
def mutated_commands(draw: st.DrawFn) -> bytes:
    """A valid command with up to three fields (top level or payload) replaced, dropped or added."""
    kind = draw(st.sampled_from(sorted(PAYLOADS)))
    document: dict[str, Any] = {"id": str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))), "type": kind,
                                "aggregate_id": "sub-1", "payload": dict(PAYLOADS[kind])}
    for _ in range(draw(st.integers(0, 3))):
        inner = document.get("payload")
        target = inner if isinstance(inner, dict) and draw(st.booleans()) else document
        name = draw(st.sampled_from(FIELDS + sorted(target)))
        if draw(st.booleans()):
            target.pop(name, None)
        else:
            target[name] = draw(json_values | st.sampled_from(TYPES))
    return json.dumps(document).encode()


bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    mutated_commands(),
    st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
)


Post = Callable[[bytes], httpx.Response]


@pytest.fixture
def post(settings: Settings, tmp_path: Path) -> Iterator[Post]:
    """POST a body to the gateway app in-process (ASGI, one event loop: no server, no thread hops).

    On this test's own topics and data dir: the isolation violations it provokes are appended to
    ``<prefix>.audit-intake`` of its own prefix, never to a user's default ``keel.*`` topics.
    """
    dsn = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    db = open_database(dsn)
    OutboxStore(db).migrate()
    keys = KeyStore(db)
    keys.create_tenant("acme")
    _, token = keys.create_key("acme", Actor(kind=ActorKind.AGENT, id="support-bot"))
    app = create_app(settings.model_copy(update={"data_dir": tmp_path}),
                     IngressSettings(outbox_dsn=dsn, gateway_max_body_bytes=4096))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    loop = asyncio.new_event_loop()
    lifespan = app.app.router.lifespan_context(app.app)
    loop.run_until_complete(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
    yield lambda raw: loop.run_until_complete(client.post("/v1/commands", content=raw, headers=headers))
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(lifespan.__aexit__(None, None, None))
    loop.run_until_complete(loop.shutdown_default_executor())  # the audit appends still under way
    loop.close()
    db.close()


def test_no_body_makes_the_gateway_fail(post: Post) -> None:
    seen: Counter[int] = Counter()

    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))
    @given(raw=bodies)
    def check(raw: bytes) -> None:
        response = post(raw)
        seen[response.status_code] += 1
        assert response.status_code < 500, response.text
        if response.status_code != 202:
            error = response.json()["error"]
            assert HTTP_STATUS[error["code"]] == response.status_code and error["message"]

    check()
    assert sum(seen.values()) >= EXAMPLES, seen
    assert seen[202] and seen[400] and seen[403] and seen[422], seen  # every door was exercised


def test_the_isolation_violations_go_to_the_tests_own_audit_intake(post: Post, settings: Settings) -> None:
    """A claimed foreign tenant is recorded in the audit intake of this test's prefix (not ``keel.*``)."""
    body = {"id": str(uuid.uuid4()), "type": "IssueRefund", "aggregate_id": "sub-1", "tenant_id": "globex",
            "payload": PAYLOADS["IssueRefund"]}
    assert post(json.dumps(body).encode()).status_code == 403
    intake, deadline = topic_name(settings, Topic.AUDIT_INTAKE), time.monotonic() + 30
    while not (found := [m for m in read_to_end(settings, intake) if b"IsolationViolation" in (m.value() or b"")]):
        assert time.monotonic() < deadline, f"no isolation violation in {intake}"
        time.sleep(0.2)
    assert intake.startswith(f"{settings.topic_prefix}.") and settings.topic_prefix != "keel"
    assert len(found) == 1
