"""Issue 14's proof: a team brings a domain Keel has never seen, through the public API only.

The test writes ``team_dns`` (agents changing DNS records; ``tests/third_domain.py``) into
its own temporary folder, outside every package of this repository, and names it to every
Keel process with ``KEEL_DOMAINS`` and ``PYTHONPATH``. Real processes (the HTTP gateway
with API keys, the outbox relay, a processor worker, the projector and the CLI) then carry
its commands end to end: the domain's default policy parks a short TTL for an admin, a
tenant policy grants admin to a human who approves it, the change is undone by the
domain's declared compensation, and ``keel state`` and the domain's own ClickHouse view,
queried per tenant, show it. Nothing of the domain lands under ``services/`` on the way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from keel.config import PROJECT_ROOT, Settings
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from tests.broker_faults import free_port
from tests.processes import KeelProcess, keel_env
from tests.third_domain import DOMAIN, PACKAGE, RULE, SCHEMAS, VIEW, write_domain

pytestmark = pytest.mark.integration

SERVICES = PROJECT_ROOT / "services"
ZONE = "example.com"
ADMIN = "human:olga.ops"
WAIT_S = 60.0

T = TypeVar("T")


# What of the team's domain could land in Keel's tree: its package, its view, its type names.
TRACE = re.compile(rf"\b({PACKAGE}|{VIEW}|SetRecord|DeleteRecord|RestoreRecord|RecordSet|RecordDeleted|"
                   r"RecordRestored)\b")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (bytecode caches aside) -> its content."""
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file() and "__pycache__" not in path.parts}


def traces(files: dict[str, bytes]) -> list[str]:
    """The files whose name or content names the team's domain (none before the run, none after)."""
    return sorted(name for name, content in files.items()
                  if TRACE.search(name) or TRACE.search(content.decode(errors="replace")))


class Platform:
    """This test's Keel: its environment, its processes, and the gateway's address."""

    def __init__(self, settings: Settings, folder: Path, team: Path) -> None:
        self.settings, self.folder = settings, folder
        self.env = {
            "KEEL_DOMAINS": PACKAGE,
            "PYTHONPATH": os.pathsep.join(p for p in (str(team), os.environ.get("PYTHONPATH", "")) if p),
            "KEEL_OUTBOX_DSN": f"sqlite:///{folder / 'outbox.sqlite3'}",
            # a chDB path of its own: `keel project`, `query` and `state` each open it in turn
            "KEEL_CLICKHOUSE_DSN": f"chdb://{folder / 'chdb'}",
            "KEEL_CLICKHOUSE_DATABASE": settings.clickhouse_database,
            "COLUMNS": "250",
        }
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.processes = [
            KeelProcess(["gateway", "--port", str(self.port)], settings, folder / "gateway.log", **self.env),
            KeelProcess(["relay"], settings, folder / "relay.log", **self.env),
            KeelProcess(["process", "--no-supervise", "--instance", f"dns-{uuid.uuid4().hex[:8]}"], settings,
                        folder / "processor.log", **self.env),
        ]

    def keel(self, *args: str) -> str:
        """Run ``keel ARGS`` to completion; its stdout (it must succeed)."""
        result = subprocess.run([sys.executable, "-m", "keel.cli", *args], env=keel_env(self.settings, **self.env),
                                text=True, capture_output=True, timeout=120, check=False)
        assert result.returncode == 0, f"`keel {' '.join(args)}` failed:\n{result.stderr}\n{result.stdout}"
        return result.stdout

    def keel_json(self, *args: str) -> Any:
        return json.loads(self.keel(*args))

    def api_key(self, tenant: str, actor: str) -> dict[str, str]:
        """The bearer header of a new API key of ``actor`` in ``tenant``."""
        made = self.keel("keys", "create", "--tenant", tenant, "--actor", actor)
        found = re.search(r"keel_[0-9a-f]{16}_\S+", made)
        assert found is not None, made
        return {"Authorization": f"Bearer {found.group(0)}"}

    def start(self) -> None:
        for process in self.processes:
            process.start()
        self.until(lambda: self._answers(), "the gateway never answered /healthz")

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in self.processes)

    def until(self, probe: Callable[[], T | None], what: str) -> T:
        """``probe()``'s first truthy answer; fails with the processes' logs after ``WAIT_S``."""
        deadline = time.monotonic() + WAIT_S
        while True:
            answer = probe()
            if answer:
                return answer
            for process in self.processes:
                assert process.alive(), f"{what}: `keel {' '.join(process.args)}` exited\n{self.logs()}"
            assert time.monotonic() < deadline, f"{what} (after {WAIT_S:.0f} s)\n{self.logs()}"
            time.sleep(0.3)

    def submit(self, key: dict[str, str], command_type: str, payload: dict[str, Any]) -> str:
        """POST a command to the gateway; its id."""
        command_id = str(uuid.uuid4())
        body = {"id": command_id, "type": command_type, "aggregate_id": ZONE, "payload": payload}
        answer = httpx.post(f"{self.base}/v1/commands", json=body, headers=key, timeout=10)
        assert answer.status_code == 202, answer.text
        return command_id

    def status(self, key: dict[str, str], command_id: str, *wanted: str) -> dict[str, Any]:
        """The gateway's record of a command once its status is one of ``wanted``."""
        def probe() -> dict[str, Any] | None:
            record = httpx.get(f"{self.base}/v1/commands/{command_id}", headers=key, timeout=10).json()
            return record if record.get("status") in wanted else None
        return self.until(probe, f"command {command_id} never reached {wanted}")

    def event_types(self, tenant: str, aggregate: str) -> list[str]:
        """The types of the events of ``tenant/aggregate``, from the events topic's record headers."""
        key = f"{tenant}/{aggregate}".encode()
        found = [dict(m.headers() or []).get("keel-type")
                 for m in read_to_end(self.settings, topic_name(self.settings, Topic.EVENTS)) if m.key() == key]
        return [value.decode() if isinstance(value, bytes) else str(value) for value in found]

    def query(self, sql: str, tenant: str) -> list[list[Any]]:
        rows: list[list[Any]] = self.keel_json("query", sql, "--tenant", tenant, "--format", "json")["rows"]
        return rows


@pytest.fixture
def platform(settings: Settings, tmp_path: Path) -> Iterator[Platform]:
    team = tmp_path / "team"  # the team's checkout: no package of this repository
    write_domain(team, schemas=False)  # the team freezes them, as docs/domains.md says
    running = Platform(settings, tmp_path, team)
    try:
        yield running
    finally:
        running.stop()


def test_a_team_brings_a_third_domain_through_the_public_api_and_keel_governs_it_end_to_end(
        platform: Platform, tmp_path: Path) -> None:
    services_before = tree(SERVICES)
    assert traces(services_before) == []  # Keel's core has never heard of DNS
    home = tmp_path / "team" / PACKAGE
    assert not home.resolve().is_relative_to(PROJECT_ROOT.resolve())

    # The team's schemas come from its models: `keel schemas freeze`, then `check` agrees.
    platform.keel("schemas", "freeze", "--domain", DOMAIN)
    for (kind, name), expected in SCHEMAS.items():
        frozen = json.loads((home / "schemas" / kind / name / "v1.avsc").read_text())
        assert _shape(frozen) == _shape(expected), name
    assert "ok" in platform.keel("schemas", "check", "--domain", DOMAIN)

    # Registered: Keel lists and describes what the team declared.
    [listed] = [d for d in platform.keel_json("domains", "list", "--json") if d["name"] == DOMAIN]
    assert listed == {"name": DOMAIN, "aggregates": "zone", "commands": 3, "events": 3, "undoable": 2,
                      "views": VIEW}
    shown = platform.keel_json("domains", "show", DOMAIN, "--json")
    assert Path(shown["home"]) == home
    assert {(t["type"], t["kind"], t["aggregate"], tuple(t["schema_versions"])) for t in shown["types"]} == {
        ("SetRecord", "command", "zone", (1,)), ("DeleteRecord", "command", "zone", (1,)),
        ("RestoreRecord", "command", "zone", (1,)), ("RecordSet", "event", "zone", (1,)),
        ("RecordDeleted", "event", "zone", (1,)), ("RecordRestored", "event", "zone", (1,))}
    assert sorted((u["event"], u["undone_by"]) for u in shown["undo"]) == [
        ("RecordDeleted", "RecordRestored"), ("RecordSet", "RecordRestored")]
    assert shown["policy_rules"] == [RULE, "apex-deletes-need-an-admin"] and shown["views"] == [VIEW]

    for tenant in ("acme", "globex"):
        platform.keel("tenants", "create", tenant, "--no-kafka")
    acme, globex = platform.api_key("acme", "agent:dns-bot"), platform.api_key("globex", "agent:dns-bot")
    platform.start()

    # An agent sets two records through the gateway; the domain's decide runs in the processor.
    first = platform.submit(acme, "SetRecord", {"name": "www", "value": "192.0.2.10", "ttl": 300})
    other = platform.submit(acme, "SetRecord", {"name": "api", "value": "lb.example.net", "ttl": 120})
    for command_id in (first, other):
        record = platform.status(acme, command_id, "executed", "rejected", "dead_lettered")
        assert record["status"] == "executed", record

    # A short TTL: the domain's default rule parks it for an admin, whom nobody is yet.
    risky = platform.submit(acme, "SetRecord", {"name": "www", "value": "198.51.100.7", "ttl": 30})
    record = platform.status(acme, risky, "pending_approval", "executed", "rejected", "dead_lettered")
    assert record["status"] == "pending_approval", record
    [parked] = platform.keel_json("approvals", "list", "--tenant", "acme", "--json")
    assert (parked["command_id"], parked["aggregate"], parked["type"], parked["actor"], parked["rule"]) == (
        risky, ZONE, "SetRecord", "agent:dns-bot", RULE)

    # The tenant publishes a policy that names its admin and keeps the domain's rule.
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({
        "version": "dns-1",
        "roles": {"dns-agent": ["SetRecord", "DeleteRecord"], "admin": ["*"]},
        "grants": {"agent:dns-bot": ["dns-agent"], ADMIN: ["admin"]},
        "approver_roles": ["admin"],
        "rules": [{"name": RULE, "match": {"command_types": ["SetRecord"], "payload": {"ttl": {"lt": 60}}},
                   "decision": "approve"}],
    }))
    platform.keel("policy", "apply", str(policy), "--tenant", "acme")
    platform.until(lambda: "PolicyPublished" in platform.event_types("acme", "controls"),
                   "the tenant policy was never published")

    # The admin approves: the parked command runs.
    platform.keel("approve", risky, "--tenant", "acme", "--as", ADMIN, "--comment", "planned cutover")
    record = platform.status(acme, risky, "executed", "rejected", "dead_lettered")
    assert record["status"] == "executed", record
    assert platform.keel_json("approvals", "list", "--tenant", "acme", "--json") == []

    # ...and undoes it: the domain's Undo restores the previous value, as a new event.
    platform.keel("undo", risky, "--tenant", "acme", "--as", ADMIN, "--reason", "wrong address")
    trail = platform.until(lambda: (types := platform.event_types("acme", ZONE))[-1:] == ["RecordRestored"] and types,
                           "the undo never yielded RecordRestored")
    assert trail == ["RecordSet", "RecordSet", "ApprovalRequested", "ApprovalGranted", "RecordSet",
                     "RecordRestored"]

    # Another tenant's agent, same zone name: its own decision, none of acme's records.
    stray = platform.submit(globex, "DeleteRecord", {"name": "www", "reason": "cleanup"})
    record = platform.status(globex, stray, "executed", "rejected", "dead_lettered")
    assert (record["status"], record["reason_code"]) == ("rejected", "no_such_record"), record

    assert "projected" in platform.keel("project")

    # The aggregate's state, folded by the domain's own evolve: the compensation shows.
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    now = platform.keel_json("state", "--tenant", "acme", "--aggregate", ZONE, "--at", later, "--json")
    assert now["state"]["aggregate_type"] == "zone" and now["state"]["pending_approvals"] == []
    assert now["state"]["records"] == {"www": {"value": "192.0.2.10", "ttl": 300},
                                       "api": {"value": "lb.example.net", "ttl": 120}}
    assert now["unprojected_events"] == 0
    approved, restored = now["events"][-2:]
    assert (approved["type"], approved["causation_id"], approved["actor"]["id"]) == ("RecordSet", risky, "dns-bot")
    assert approved["payload"] == {"name": "www", "value": "198.51.100.7", "ttl": 30,
                                   "previous_value": "192.0.2.10", "previous_ttl": 300}
    assert (approved["authority"]["role"], approved["authority"]["policy_rule"]) == ("dns-agent", RULE)
    assert (restored["type"], restored["actor"]["id"]) == ("RecordRestored", "olga.ops")
    assert restored["payload"] == {"name": "www", "value": "192.0.2.10", "ttl": 300, "reason": "wrong address",
                                   "undoes": risky}
    assert restored["correlation_id"] == approved["correlation_id"]
    then = platform.keel_json("state", "--tenant", "acme", "--aggregate", ZONE, "--at", str(approved["version"]),
                              "--json")
    assert then["state"]["records"]["www"] == {"value": "198.51.100.7", "ttl": 30}

    # The domain's view, queried per tenant.
    records = f"SELECT zone, name, value, ttl, last_change, changes FROM {VIEW} ORDER BY name"
    assert platform.query(records, "acme") == [[ZONE, "api", "lb.example.net", 120, "RecordSet", 1],
                                               [ZONE, "www", "192.0.2.10", 300, "RecordRestored", 3]]
    # The compensation was a command of its own, caused by the undone one (the commands projection).
    assert platform.query("SELECT toString(event_id), actor_id, toString(causation_id) FROM commands "
                          "WHERE type = 'RestoreRecord'", "acme") == [[restored["causation_id"], "olga.ops", risky]]
    assert platform.query(records, "globex") == []
    assert platform.query("SELECT type FROM events ORDER BY occurred_at", "globex") == [["CommandRejected"]]

    for process in platform.processes:
        assert "Traceback" not in process.output(), platform.logs()
    # The core was not touched: the domain lives only in the team's folder.
    services_after = tree(SERVICES)
    changed = sorted(name for name in services_before.keys() | services_after.keys()
                     if services_before.get(name) != services_after.get(name))
    assert traces(services_after) == [] and changed == [], f"services/ changed: {changed}"


def _shape(schema: dict[str, Any]) -> object:
    """What a schema says about the wire, without its docs."""
    fields = [{k: v for k, v in f.items() if k != "doc"} for f in schema["fields"]]
    return schema["name"], schema["namespace"], fields
