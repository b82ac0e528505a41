"""The support desk's demo (``keel demo``, ``make demo``): the story Keel exists for, as agents meet it.

It starts the whole platform (``keel dev``: broker, gateway, relay, processor, chainer,
effect worker, projector, watchers) in the background unless it runs, with a provider
simulator (``keel.testing.provider``) standing in for the payments and e-mail providers
unless ``SUPPORT_DESK_PAYMENTS_URL`` / ``SUPPORT_DESK_EMAIL_URL`` name real ones. It
registers two tenants with an API key per actor, and sends each tenant's story through the
gateway over HTTP, as a real agent would. A support lead delegates a cancellation to an AI
agent. The agent cancels the subscription, refunds part of the fee (paid out at the
provider), tries to refund more than was paid (rejected by the domain), proposes a goodwill
refund it is unsure of (parked by the policy until the customer confirms), and queues a
follow-up email (sent by the provider). The demo prints what became of each command and
its effect, and what each tenant's analyst sees in ClickHouse through ``GET /v1/query``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, Authority, DelegationLink, Envelope, Payload, new_command
from keel.domain.personal import is_sealed
from keel.errors import InfraError
from keel.gateway.settings import IngressSettings
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.security.keys import KeyStore
from keel.supervision.platform import SERVICES, PlatformState, alive, health, log_path, state_path

from support_desk.effects import EMAIL_URL, PAYMENTS_URL
from support_desk.messages import CancelSubscription, IssueRefund, SendEmail, StartSubscription

TENANT_QUERY = """
SELECT version, type, actor_kind || ':' || actor_id AS actor, on_behalf_of,
       authority_role AS role, JSONExtractString(payload, 'code') AS rejection
FROM events
WHERE aggregate_id = {aggregate:String}
ORDER BY _partition, _offset
"""
"""What a tenant's analyst asks; the gateway scopes it to the key's tenant."""
TENANTS = {"acme": ("cust-ada", 4900, "EUR"), "globex": ("cust-bob", 12000, "USD")}
BILLING = Actor(kind=ActorKind.SERVICE, id="billing")
AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
ANALYST = "ana.analyst"
PROVIDER = "http://127.0.0.1:18795"
"""Where the demo's provider simulator listens, unless the environment names real providers."""


def story(tenant: str, subscription: str) -> list[Envelope]:
    """The commands of one tenant's story, in order."""
    customer, price, currency = TENANTS[tenant]
    billing, agent = BILLING, AGENT
    lead = DelegationLink(actor=Actor(kind=ActorKind.HUMAN, id="jane.lead"),
                          reason="customer asked to cancel and be refunded")
    support_agent = Authority(role="support-agent")
    start = new_command(StartSubscription(customer_id=customer, plan="pro", monthly_price_cents=price,
                                          currency=currency),
                        tenant_id=tenant, aggregate_id=subscription, actor=billing,
                        on_behalf_of=customer, authority=Authority(role="billing-service"))

    def by_agent(payload: Payload) -> Envelope:
        """The agent's command, delegated by the lead, on the customer's behalf."""
        return new_command(payload, tenant_id=tenant, aggregate_id=subscription, actor=agent,
                           on_behalf_of=customer, delegation=(lead,),
                           authority=support_agent, correlation_id=start.id)

    return [
        start,
        by_agent(CancelSubscription(reason="customer request")),
        by_agent(IssueRefund(amount_cents=price // 2, currency=currency, reason="unused half month",
                             confidence=0.93)),
        by_agent(IssueRefund(amount_cents=price * 2, currency=currency, reason="refund everything twice",
                             confidence=0.95)),
        by_agent(IssueRefund(amount_cents=price // 10, currency=currency, reason="goodwill",
                             confidence=0.41)),
        by_agent(SendEmail(to_address=f"{customer}@example.com", template="cancellation-confirmed")),
    ]


def demo() -> None:
    """Run the platform (``keel dev``, in the background), play the story for two tenants through
    the gateway with their API keys, and show the outcomes and what each tenant's analyst sees."""
    console = Console(width=None if Console().is_terminal else 160)
    settings, ingress = Settings(), IngressSettings()
    gateway = f"http://{ingress.gateway_host}:{ingress.gateway_port}"
    _platform(settings, console, gateway)
    keys = _register(settings)
    run = uuid.uuid4().hex[:6]
    aggregate = f"sub-{run}"
    with httpx.Client(base_url=gateway, timeout=30) as http:
        sent = [(tenant, command, _submit(http, keys[tenant][command.actor.id], command))
                for tenant in TENANTS for command in story(tenant, aggregate)]
        console.print(f"sent {len(sent)} commands through the gateway ({gateway}) with each actor's API key "
                      f"(run {run}); delegation on every agent command: human:jane.lead → agent:support-bot "
                      "(customer asked to cancel and be refunded)", soft_wrap=True)
        outcomes = Table(title="what became of each command and its effect (GET /v1/commands/{id})")
        for column in ("tenant", "command", "actor", "status", "why", "effect"):
            outcomes.add_column(column, overflow="fold")
        for tenant, command, command_id in sent:
            record = _settled(http, keys[tenant][command.actor.id], command_id)
            outcomes.add_row(tenant, command.type, f"{command.actor.kind}:{command.actor.id}", record["status"],
                             record.get("reason_code") or record.get("reason") or "", _effect(record))
        console.print(outcomes)
        console.print("the unsure goodwill refund waits for the customer (`keel approvals list --tenant acme`)")
        for tenant in TENANTS:
            rows = _projected(http, keys[tenant][ANALYST], aggregate, expected=len(story(tenant, aggregate)))
            table = Table(title=f"ClickHouse: tenant {tenant}, subscription {aggregate} (GET /v1/query, analyst key)")
            for column in rows["columns"]:
                table.add_column(str(column), overflow="fold")
            for row in rows["rows"]:
                table.add_row(*(_cell(value) for value in row))
            console.print(table)
    console.print(f"events of this run in Kafka: {len(_events_of(settings, aggregate))}; the platform keeps running "
                  "in the background (`keel status` shows it, `keel down` stops it)", soft_wrap=True)


def _platform(settings: Settings, console: Console, gateway: str) -> None:
    """Start ``keel dev`` in the background unless it runs; wait until every service is healthy
    and the gateway answers (a live process may not listen yet)."""
    state = PlatformState.read(state_path(settings))
    providers = {name: os.environ.get(name) or PROVIDER for name in (PAYMENTS_URL, EMAIL_URL)}
    if state is None or not alive(state.supervisor_pid):
        logs = log_path(settings, "dev").parent
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "dev-console.log").open("ab") as out:
            subprocess.Popen([sys.executable, "-m", "keel.cli", "dev"], stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **providers})
    deadline = time.monotonic() + 180
    with console.status("starting the platform (`keel dev`: broker, gateway, relay, processor, projector, …)"):
        while (problems := _unhealthy(settings) or _unanswered(gateway)) and time.monotonic() < deadline:
            time.sleep(0.5)
    if problems:
        raise InfraError(f"the platform did not come up: {'; '.join(problems)} (logs: "
                         f"{log_path(settings, 'dev').parent})", code="platform_unhealthy")
    console.print(f"platform: every service healthy (logs under {log_path(settings, 'dev').parent})")
    if PROVIDER in providers.values():
        _simulate_providers(settings)
        console.print(f"providers: a simulator at {PROVIDER} stands in for payments and e-mail "
                      f"(set {PAYMENTS_URL} and {EMAIL_URL} for real ones); it stops with `keel down`")


def _simulate_providers(settings: Settings) -> None:
    """Start the provider simulator, tied to ``keel dev``, unless it already answers."""
    try:
        httpx.get(f"{PROVIDER}/_control/stats", timeout=2).raise_for_status()
        return
    except httpx.HTTPError:
        pass
    state = PlatformState.read(state_path(settings))
    assert state is not None  # the platform is healthy
    port = PROVIDER.rsplit(":", 1)[1]
    with log_path(settings, "provider-simulator").open("ab") as out:
        subprocess.Popen([sys.executable, "-m", "keel.testing.provider", "--port", port,
                          "--exit-with", str(state.supervisor_pid)], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)

def _unhealthy(settings: Settings) -> list[str]:
    state = PlatformState.read(state_path(settings))
    if state is None or not alive(state.supervisor_pid):
        return ["keel dev is starting"]
    return [f"{service.name}: {problem}" for service in SERVICES
            if (problem := health(settings, service, state.services[service.name])
                if service.name in state.services else "starting") is not None]


def _unanswered(gateway: str) -> list[str]:
    try:
        answer = httpx.get(f"{gateway}/healthz", timeout=2)
    except httpx.HTTPError as exc:
        return [f"the gateway does not answer at {gateway} yet ({type(exc).__name__})"]
    return [] if answer.status_code == 200 else [f"the gateway answers {answer.status_code} at {gateway}/healthz"]


def _register(settings: Settings) -> dict[str, dict[str, str]]:
    """The story's tenants and an API key per actor (and an analyst's), as an operator would make them."""
    db = open_database(IngressSettings().dsn(settings))
    try:
        OutboxStore(db).migrate()
        keys = KeyStore(db)
        tokens: dict[str, dict[str, str]] = {}
        for tenant in TENANTS:
            keys.create_tenant(tenant)
            tokens[tenant] = {actor.id: keys.create_key(tenant, actor, roles)[1] for actor, roles in (
                (BILLING, frozenset({"billing-service"})), (AGENT, frozenset({"support-agent"})),
                (Actor(kind=ActorKind.HUMAN, id=ANALYST), frozenset({"analyst"})))}
    finally:
        db.close()
    return tokens


def _submit(http: httpx.Client, token: str, command: Envelope) -> str:
    answer = http.post("/v1/commands", content=command.model_dump_json(), headers=_bearer(token))
    if answer.status_code not in (200, 201, 202):
        raise InfraError(f"the gateway refused {command.type}: {answer.status_code} {answer.text}",
                         code="demo_refused")
    return str(answer.json()["command_id"])


def _settled(http: httpx.Client, token: str, command_id: str) -> dict[str, Any]:
    """The command's record once it has an outcome (parked counts as one) and its effects settled."""
    deadline = time.monotonic() + 120
    while True:
        record: dict[str, Any] = http.get(f"/v1/commands/{command_id}", headers=_bearer(token)).json()
        decided = record.get("status") not in ("accepted", "published")
        if decided and (record.get("status") != "executed" or record["summary"]["done"]) \
                or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


def _effect(record: dict[str, Any]) -> str:
    """What the command's effects did, in a few words: their state and what the provider said."""
    shown = []
    for effect in record.get("effects", ()):
        said = effect.get("result") or effect.get("error_code") or effect.get("reason") or ""
        shown.append(f"{effect['provider']}: {effect['state']} {_brief(said)}".strip())
    return "; ".join(shown)


def _brief(said: str) -> str:
    """The ids in a handler's JSON result (what the provider made), or the code as it is."""
    try:
        result = json.loads(said)
    except ValueError:
        return said
    return ", ".join(f"{k}={v}" for k, v in result.items() if k.endswith("_id")) if isinstance(result, dict) else said


def _projected(http: httpx.Client, token: str, aggregate: str, expected: int) -> dict[str, Any]:
    """The analyst's view of the story once the projector holds its events."""
    sql = TENANT_QUERY.replace("{aggregate:String}", f"'{aggregate}'")
    deadline = time.monotonic() + 120
    while True:
        answer = http.get("/v1/query", params={"sql": sql}, headers=_bearer(token))
        result: dict[str, Any] = answer.json()
        if answer.status_code == 200 and len(result["rows"]) >= expected or time.monotonic() > deadline:
            if answer.status_code != 200:
                raise InfraError(f"GET /v1/query failed: {answer.status_code} {answer.text}", code="demo_refused")
            return result
        time.sleep(0.5)


def _events_of(settings: Settings, aggregate: str) -> list[Envelope]:
    codec = EnvelopeCodec()
    return [event for m in read_to_end(settings, topic_name(settings, Topic.EVENTS))
            if (event := codec.decode(m.value() or b"")).aggregate_id == aggregate]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _cell(value: object) -> str:
    return "⟨sealed⟩" if is_sealed(value) else "" if value is None else str(value)
