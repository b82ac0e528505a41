"""The published OpenAPI document is exact: schemathesis, fed ``GET /openapi.json`` and a valid key,
runs every check over every operation the document lists and finds nothing, and no answer is a 5xx.

A real gateway (uvicorn, SQLite outbox, the test's Kafka topics) with a real chDB holding the
projections, so ``/v1/query`` answers 200 to the analyst key and schemathesis sees every door.
Whatever routes the document lists when this runs are covered: the test names none of them,
except to check that the run reached the ones that must answer 2xx.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from clickhouse_connect.driver.client import Client
from schemathesis import Case
from schemathesis.engine import events, from_schema
from schemathesis.engine.recorder import ScenarioRecorder

from keel.bootstrap import ensure_local_keys
from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind
from keel.gateway.app import create_app
from keel.gateway.settings import IngressSettings
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.security.keys import KeyStore
from tests.platform import serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXAMPLES = 15
"""Examples per operation and phase: the whole run stays well under 90 s."""
ROLES = frozenset({"analyst", "approver", "auditor", "personal_data"})
WINDOW_S = 30 * 24 * 3600
"""The processor's dedupe window (``KEEL_PROCESSOR_DEDUPE_WINDOW_S``): the oldest ``occurred_at`` accepted."""
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]
"""schemathesis' statuses of a rejected schema-violating request (its default)."""
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
"""schemathesis' statuses of an accepted schema-valid request (its default); 5xx fail not_a_server_error."""


@dataclass
class Run:
    """What one schemathesis run saw: check failures and statuses per operation."""

    failures: dict[str, str] = field(default_factory=dict)
    """One example of each kind of failure (operation, check, title)."""
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    server_errors: dict[str, str] = field(default_factory=dict)
    """One example of each kind of 5xx answer."""
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def gateway(settings: Settings, migrated: Client, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A gateway on a free port and the token of an analyst key of tenant acme."""
    dsn = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    db = open_database(dsn)
    OutboxStore(db).migrate()
    keys = KeyStore(db)
    keys.create_tenant("acme")
    _, token = keys.create_key("acme", Actor(kind=ActorKind.HUMAN, id="ann"), ROLES)
    own = settings.model_copy(update={"data_dir": tmp_path})
    ensure_local_keys(own)  # as after `keel up`: personal values sealed, the audit chain verifiable
    assert own.processor_dedupe_window_s == WINDOW_S
    app = create_app(own, IngressSettings(outbox_dsn=dsn, gateway_key_cache_s=0))
    with serving(app) as url:
        yield url, token
    db.close()


def fuzz(url: str, token: str) -> Run:
    """Every phase and every check of schemathesis, positive and negative data, over the published spec."""
    config = schemathesis.Config.from_dict({
        "seed": 1,
        "continue-on-failure": True,  # every kind of failure, not only each operation's first
        "request-timeout": 20,
        "max-stream-events": 1,  # a command's stream may run for minutes: its first event will do
        "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none"},
        "auth": {"openapi": {"HTTPBearer": {"bearer": token}}},
        # Every check runs; two are told of refusals the OpenAPI document states but JSON Schema cannot:
        "checks": {"negative_data_rejection": {"expected-statuses": [*REJECTED, "413"]}},  # a body over the limit
        "operations": [{"include-path": "/v1/query", "checks": {"positive_data_acceptance": {
            "expected-statuses": [*ACCEPTED, "400"]}}}],  # SQL that does not parse, or reads outside the tenant
    })
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    schema.hook("map_case")(_within_the_dedupe_window)
    run = Run()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _record(event.recorder, run)
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            run.errors.append(str(getattr(event, "value", None) or getattr(event, "exception", event)))
    return run


def _within_the_dedupe_window(_context: object, case: Case[Any]) -> Case[Any]:
    """A command's ``occurred_at`` must lie within the processor's dedupe window of now, else
    ``beyond_dedupe_window`` (422): a rule relative to the clock, which JSON Schema cannot state
    (the field's description does). Generated instants older than the window become now; every
    other value, and every malformed or zoneless ``occurred_at``, is sent as generated."""
    body = case.body
    if isinstance(body, dict) and isinstance(sent := body.get("occurred_at"), str):
        try:
            at = datetime.fromisoformat(sent)
        except ValueError:
            return case
        now = datetime.now(UTC)
        if at.tzinfo is not None and at < now - timedelta(seconds=WINDOW_S):
            body["occurred_at"] = now.isoformat()
    return case


def _record(recorder: ScenarioRecorder, run: Run) -> None:
    for interaction in recorder.interactions.values():
        response, request = interaction.response, interaction.request
        if response is None:
            continue
        run.statuses.setdefault(recorder.label, Counter())[response.status_code] += 1
        if response.status_code >= 500:
            run.server_errors.setdefault(f"{recorder.label} {response.status_code} {response.content[:60]!r}",
                                         f"{request.method} {request.uri} -> {response.status_code}: "
                                         f"{response.content[:300]!r}")
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.failure_info is None:
                continue
            failure, answer = check.failure_info.failure, recorder.interactions.get(case_id)
            got = (f"{answer.response.status_code} {answer.response.content[:200]!r}"
                   if answer is not None and answer.response is not None else "no response")
            kind = f"{recorder.label} [{check.name}] {failure.title}"
            run.failures.setdefault(kind, f"{kind}: {failure.message}\n    {check.failure_info.code_sample}"
                                          f"\n    -> {got}")


def test_the_published_spec_holds_under_every_check(gateway: tuple[str, str]) -> None:
    url, token = gateway
    published = {f"{method.upper()} {path}" for path, methods in httpx.get(f"{url}/openapi.json").json()[
        "paths"].items() for method in methods}

    run = fuzz(url, token)

    seen = {label: set(statuses) for label, statuses in run.statuses.items()}
    gaps = [f"{label} never answered {status} ({what}); it answered {sorted(seen.get(label, ()))}"
            for label, status, what in [*[(label, 401, "no key: ignored_auth") for label in sorted(published)],
                                        ("POST /v1/commands", 202, "a valid command body"),
                                        ("POST /v1/explain", 200, "a valid command body"),
                                        ("GET /v1/query", 200, "a query that runs")]
            if status not in seen.get(label, ())]
    found = [*run.errors, *run.server_errors.values(), *run.failures.values(), *gaps]
    assert not found, f"{len(found)} problems:\n" + "\n".join(found)
