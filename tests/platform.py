"""A whole platform of real processes for end-to-end tests: gateway, relay, processor, effect worker.

``running_platform`` gives one tenant (``acme``) a published policy and an API key per
actor, starts a provider simulator as its payments and e-mail providers, runs every service
(and any ``extra`` ones, which may use the gateway's URL) as ``keel`` processes on the
test's topics, and waits until the gateway answers under the policy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from keel.config import Settings
from keel.domain.commands import SetPolicy
from keel.domain.envelope import Actor
from keel.domain.governance.policy import SYSTEM_ACTOR, Policy, parse_policy
from keel.gateway.actions import allowed_actions
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.security.keys import KeyStore
from keel.testing.provider import ProviderSimulator
from tests.broker_faults import free_port
from tests.helpers import command, send
from tests.processes import KeelProcess

TENANT = "acme"


@dataclass(frozen=True)
class RunningPlatform:
    gateway: str
    """The gateway's base URL."""
    tokens: dict[str, str]
    """Actor id -> its API key."""
    provider: ProviderSimulator


@contextmanager
def running_platform(settings: Settings, tmp: Path, actors: Iterable[Actor], policy: dict[str, Any],
                     extra: Callable[[str], dict[str, list[str]]] = lambda gateway: {}) -> Iterator[RunningPlatform]:
    """Every service running for ``actors`` of tenant acme under ``policy``; ``extra(gateway_url)``
    names more ``keel`` processes (name -> arguments) to run beside them."""
    dsn = f"sqlite:///{tmp / 'outbox.sqlite3'}"
    db = open_database(dsn)
    OutboxStore(db).migrate()
    keys = KeyStore(db)
    keys.create_tenant(TENANT)
    tokens = {actor.id: keys.create_key(TENANT, actor, frozenset())[1] for actor in actors}
    db.close()
    with ProviderSimulator() as provider:
        port = free_port()  # after the simulator took its own: the two never get the same port
        gateway = f"http://127.0.0.1:{port}"
        env = {"KEEL_OUTBOX_DSN": dsn, "KEEL_GATEWAY_PORT": str(port), "KEEL_GATEWAY_KEY_CACHE_S": "0",
               "SUPPORT_DESK_PAYMENTS_URL": provider.url, "SUPPORT_DESK_EMAIL_URL": provider.url}
        named = {"gateway": ["gateway"], "relay": ["relay"], "processor": ["process", "--no-supervise", "--instance",
                                                                          "p1"],
                 "effects": ["effects", "run", "--no-supervise", "--instance", "e1"], **extra(gateway)}
        services = [KeelProcess(args, settings, tmp / f"{name}.log", **env) for name, args in named.items()]
        send(settings, command(TENANT, "controls", SetPolicy(document=json.dumps(policy)), actor=SYSTEM_ACTOR))
        for service in services:
            service.start()
        try:
            wait_until(lambda: answers(f"{gateway}/healthz"), "the gateway answering /healthz")
            in_force = parse_policy(json.dumps(policy))
            for actor in actors:  # the processor decided the policy and the gateway follows it
                wait_until(lambda: _actions(gateway, tokens[actor.id]) == _allowed(in_force, actor),
                           f"the gateway listing {actor.id}'s actions under policy {in_force.version}")
            yield RunningPlatform(gateway, tokens, provider)
        finally:
            for service in services:
                service.stop(grace_s=10)


def _actions(gateway: str, token: str) -> set[str] | None:
    """The action types the gateway lists for ``token``'s actor (None if it does not answer yet)."""
    try:
        listed = httpx.get(f"{gateway}/v1/actions", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    except httpx.HTTPError:
        return None
    if listed.status_code != 200:
        return None
    assert listed.headers.get("content-type") == "application/json", (
        f"GET /v1/actions answered 200 with {listed.headers.get('content-type')}: {listed.text[:300]!r} "
        "(another server on the gateway's port?)")
    return {action["type"] for action in listed.json()["actions"]}


def _allowed(policy: Policy, actor: Actor) -> set[str]:
    return {action.type for action in allowed_actions(policy, actor)}


def answers(url: str) -> bool:
    """Whether anything answers HTTP at ``url``."""
    try:
        httpx.get(url, timeout=2)
        return True
    except httpx.HTTPError:
        return False


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` (what ``keel.gateway.app.create_app`` returns) served by uvicorn in a thread on a free
    port, once it has read the controls topic; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the gateway did not start"
            time.sleep(0.05)
        assert app.app.state.controls_read.wait(30), "the gateway did not read the controls topic"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)


@dataclass(frozen=True)
class Outbox:
    """A migrated SQLite outbox of a test: its DSN, and its command and key stores (one connection)."""

    dsn: str
    store: OutboxStore
    keys: KeyStore

    def close(self) -> None:
        self.store.db.close()


def sqlite_outbox(tmp: Path, *tenants: str) -> Outbox:
    """A migrated outbox under ``tmp`` that knows ``tenants``."""
    dsn = f"sqlite:///{tmp / 'outbox.sqlite3'}"
    db = open_database(dsn)
    store, keys = OutboxStore(db), KeyStore(db)
    store.migrate()
    for tenant in tenants:
        keys.create_tenant(tenant)
    return Outbox(dsn, store, keys)


def put_in_force(settings: Settings, processor: Any, policy: dict[str, Any], tenant: str = TENANT) -> None:
    """Publish ``tenant``'s ``policy`` and let ``processor`` (a ``CommandProcessor``) decide it."""
    send(settings, command(tenant, "controls", SetPolicy(document=json.dumps(policy)), actor=SYSTEM_ACTOR))
    processor.run_until_caught_up()
