"""Issue 15 item 1: analysts keep querying while the projector owns the embedded engine.

chDB lets one process open a data path. ``keel project --follow`` opens it, projects, and
serves it to every other process over a local ClickHouse-compatible HTTP address
(``keel.analytics.owner``). This test runs the platform as real processes on its own data
dir, topics and chDB path: the gateway (an agent key sends commands, an analyst key queries
``GET /v1/query``), the outbox relay, a processor worker and the projector, the owner.

While a steady stream of support-desk stories flows in (a subscription, a refund, an
e-mail sealed for the customer), one thread queries through the gateway and another runs
``keel query`` in a loop, and the test, one process after another, rebuilds and rolls back
``events`` and ``commands``, rebuilds ``tenant_hourly`` (behind the domain's
``refund_totals``), erases a customer and reads an aggregate's past state with ``keel
state``. No query may fail, every maintenance command must succeed, and afterwards the
projection holds each event and command of the topics exactly once, the analysts' counts
agree with the topics, and only the erased customer's personal fields read ``⟨erased⟩``.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import clickhouse_connect
import httpx
import pytest
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

from keel.analytics.owner import address_file, served_dsn
from keel.bootstrap import ensure_local_keys
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.personal import ERASED, SEALED_PREFIX
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from tests.broker_faults import free_port
from tests.processes import KeelProcess, keel_env

pytestmark = pytest.mark.integration

TENANT = "acme"
CUSTOMERS = ("cust-ana", "cust-ben", "cust-cleo")
GONE = "cust-gone"  # the customer erased midway; no story of theirs is sent after that
COMMANDS_PER_S = 15.0
WAIT_S = 90.0
MIN_RUNS = 20  # queries through each of the gateway and the CLI
CLI_LOOPS = 2  # `keel query` processes at a time (each starts Python: ~2-3 s)
HTTP_QUERIES = ("SELECT count() FROM events", "SELECT * FROM refund_totals", "SELECT count() FROM commands")
CLI_QUERY = "SELECT count() FROM events"
MAINTENANCE = (("projections", "rebuild", "events"), ("projections", "rollback", "events"),
               ("projections", "rebuild", "commands"), ("projections", "rollback", "commands"),
               ("projections", "rebuild", "tenant_hourly"))

T = TypeVar("T")


@dataclass
class Sample:
    """One successful count of ``events`` an analyst saw, and when."""

    at: float
    count: int
    via: str


@dataclass
class Observations:
    """What the query loops saw: runs, failures, and every count of ``events``."""

    runs: dict[str, int] = field(default_factory=lambda: {"gateway": 0, "cli": 0})
    failures: list[str] = field(default_factory=list)
    counts: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ran(self, via: str) -> None:
        with self.lock:
            self.runs[via] += 1

    def failed(self, via: str, what: str) -> None:
        with self.lock:
            self.failures.append(f"[{via} @{time.monotonic():.1f}] {what}")

    def counted(self, via: str, count: int) -> None:
        with self.lock:
            self.counts.append(Sample(time.monotonic(), count, via))

    def last_count_before(self, moment: float) -> int:
        with self.lock:
            seen = [s.count for s in self.counts if s.at < moment]
        assert seen, "no query counted events before the maintenance began"
        return seen[-1]


class Service:
    """This test's Keel: its settings and environment, its processes, the gateway's address."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings = settings
        self.env = {
            "KEEL_OUTBOX_DSN": f"sqlite:///{folder / 'outbox.sqlite3'}",
            "KEEL_CLICKHOUSE_DSN": settings.analytics_dsn,  # the test's own chDB path, never the session's
            "KEEL_CLICKHOUSE_DATABASE": settings.clickhouse_database,
            "COLUMNS": "250",
        }
        self.base = f"http://127.0.0.1:{free_port()}"
        port = self.base.rsplit(":", 1)[1]
        self.owner = KeelProcess(["project", "--follow"], settings, folder / "project.log", **self.env)
        self.processes = [
            self.owner,
            KeelProcess(["gateway", "--port", port], settings, folder / "gateway.log", **self.env),
            KeelProcess(["relay"], settings, folder / "relay.log", **self.env),
            KeelProcess(["process", "--no-supervise", "--instance", f"p-{uuid.uuid4().hex[:8]}"], settings,
                        folder / "processor.log", **self.env),
        ]

    def keel(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``keel ARGS`` run to completion (its outcome, not checked)."""
        return subprocess.run([sys.executable, "-m", "keel.cli", *args], env=keel_env(self.settings, **self.env),
                              text=True, capture_output=True, timeout=timeout_s, check=False)

    def keel_ok(self, *args: str) -> str:
        """``keel ARGS``'s stdout; it must exit 0."""
        done = self.keel(*args)
        assert done.returncode == 0, f"`keel {' '.join(args)}` exited {done.returncode}:\n{done.stderr}\n{done.stdout}"
        return done.stdout

    def api_key(self, actor: str, role: str) -> str:
        made = self.keel_ok("keys", "create", "--tenant", TENANT, "--actor", actor, "--role", role)
        found = re.search(r"keel_[0-9a-f]{16}_\S+", made)
        assert found is not None, made
        return found.group(0)

    def start(self) -> None:
        for process in self.processes:
            process.start()
        self.until(self._answers, "the gateway never answered /healthz")

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def engine(self) -> Client:
        """A client on the owner's HTTP address (this process must never open the test's chDB path)."""
        dsn = self.until(lambda: served_dsn(self.settings),
                         f"the projector never published {address_file(self.settings)}")
        client = clickhouse_connect.get_client(dsn=dsn)
        client.database = self.settings.clickhouse_database
        return client

    def stop(self) -> None:
        for process in self.processes:  # the owner last but one, after the gateway stopped querying
            process.stop(sig=signal.SIGINT if process is self.owner else signal.SIGTERM, grace_s=30)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in self.processes)

    def assert_alive(self) -> None:
        for process in self.processes:
            if not process.alive():
                code = process.process.returncode if process.process is not None else None
                raise AssertionError(f"`keel {' '.join(process.args)}` exited ({code})\n{self.logs()}")

    def until(self, probe: Callable[[], T | None], what: str | Callable[[], str], wait_s: float = WAIT_S) -> T:
        """``probe()``'s first truthy answer; fails with ``what`` and the processes' logs after ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            answer = probe()
            if answer:
                return answer
            self.assert_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"{what if isinstance(what, str) else what()} (after {wait_s:.0f} s)\n"
                                     f"{self.logs()}")
            time.sleep(0.3)


class Stream(threading.Thread):
    """Support-desk stories through the gateway at a steady rate: start, refund, e-mail on behalf of a customer."""

    def __init__(self, base: str, token: str) -> None:
        super().__init__(name="stream", daemon=True)
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        self.stop_event = threading.Event()
        self.retired: set[str] = set()  # customers no story is sent for any more
        self.accepted: dict[str, list[str]] = {}  # customer -> command ids the gateway acknowledged
        self.aggregates: list[str] = []
        self.stories = 0
        self.refused: list[str] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        interval, next_at = 1.0 / COMMANDS_PER_S, time.monotonic()
        while not self.stop_event.is_set():
            with self.lock:  # the customer is chosen and the story counted at once (``retire``)
                customers = [c for c in (GONE, *CUSTOMERS) if c not in self.retired]
                story, self.stories = self.stories, self.stories + 1
                customer = customers[story % len(customers)]
            aggregate = f"sub-{story}"
            for command_type, payload in (
                    ("StartSubscription", {"customer_id": customer, "plan": "pro", "monthly_price_cents": 5000,
                                           "currency": "EUR"}),
                    ("IssueRefund", {"amount_cents": 100, "currency": "EUR", "reason": "goodwill"}),
                    ("SendEmail", {"to_address": f"{customer}-{story}@example.com", "template": "refund-issued",
                                   "body": f"Dear {customer}, your refund is on its way."})):
                self.send(customer, aggregate, command_type, payload)
                next_at += interval
                self.stop_event.wait(max(0.0, next_at - time.monotonic()))
            with self.lock:
                self.aggregates.append(aggregate)

    def send(self, customer: str, aggregate: str, command_type: str, payload: dict[str, Any]) -> None:
        command_id = str(uuid.uuid4())
        try:
            answer = self.http.post("/v1/commands", json={
                "id": command_id, "type": command_type, "aggregate_id": aggregate, "on_behalf_of": customer,
                "payload": payload})
        except httpx.HTTPError as exc:
            self.refused.append(f"{command_type}: {exc!r}")
            return
        if answer.status_code != 202:
            self.refused.append(f"{command_type}: {answer.status_code} {answer.text[:300]}")
            return
        with self.lock:
            self.accepted.setdefault(customer, []).append(command_id)

    def retire(self, customer: str) -> list[str]:
        """Send no more stories for ``customer`` (after the current one); the ids acknowledged for them."""
        with self.lock:
            self.retired.add(customer)
            under_way = self.stories
        deadline = time.monotonic() + 30
        while self.stories <= under_way:  # the story under way, theirs or not, completes
            assert time.monotonic() < deadline and self.is_alive(), "the stream stalled"
            time.sleep(0.05)
        with self.lock:
            return list(self.accepted.get(customer, []))

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)
        self.http.close()


class Loop(threading.Thread):
    """Run one query after another until stopped, counting every failure."""

    def __init__(self, name: str, step: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.step, self.stop_event = step, threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.step()

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)


def gateway_queries(base: str, token: str, seen: Observations) -> Callable[[], None]:
    """One round of the analyst's queries through ``GET /v1/query``."""
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def step() -> None:
        for sql in HTTP_QUERIES:
            seen.ran("gateway")
            try:
                answer = http.get("/v1/query", params={"sql": sql})
            except httpx.HTTPError as exc:
                seen.failed("gateway", f"{sql}: {exc!r}")
                continue
            if answer.status_code != 200:
                seen.failed("gateway", f"{sql}: {answer.status_code} {answer.text[:500]}")
                continue
            rows = answer.json()["rows"]
            if sql == HTTP_QUERIES[0]:
                seen.counted("gateway", int(rows[0][0]))
            elif sql == HTTP_QUERIES[1] and not rows:
                seen.failed("gateway", f"{sql}: no rows")
    return step


def cli_queries(service: Service, seen: Observations) -> Callable[[], None]:
    """One ``keel query`` process."""
    def step() -> None:
        seen.ran("cli")
        try:
            done = service.keel("query", "--tenant", TENANT, "--format", "json", CLI_QUERY, timeout_s=60)
        except subprocess.TimeoutExpired:
            seen.failed("cli", "timed out")
            return
        if done.returncode != 0 or done.stderr.strip():
            seen.failed("cli", f"exit {done.returncode}: {done.stderr.strip()[-800:]} {done.stdout[-300:]}")
            return
        try:
            seen.counted("cli", int(json.loads(done.stdout)["rows"][0][0]))
        except (ValueError, KeyError, IndexError) as exc:
            seen.failed("cli", f"unreadable output ({exc!r}): {done.stdout[-300:]}")
    return step


def analyst_count(service: Service, token: str, sql: str) -> int:
    answer = httpx.get(f"{service.base}/v1/query", params={"sql": sql},
                       headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["rows"][0][0])


def topic_ids(settings: Settings, topic: Topic) -> list[uuid.UUID]:
    """The envelope id of every committed record of ``topic``."""
    codec = EnvelopeCodec()
    return [codec.decode(m.value() or b"").id for m in read_to_end(settings, topic_name(settings, topic))]


def projected_ids(engine: Client, table: str) -> list[uuid.UUID]:
    """The ids of every row of ``table`` as analysts see it (collapsed: ``FINAL``)."""
    rows = engine.query(f"SELECT event_id FROM {quote_identifier(table)} FINAL").result_rows
    return [uuid.UUID(str(row[0])) for row in rows]


def personal_fields(engine: Client, table: str, command_type: str) -> dict[str, list[str]]:
    """Customer -> the ``to_address`` and ``body`` values of their ``command_type`` rows in ``table``."""
    found: dict[str, list[str]] = {}
    for subject, payload in engine.query(
            f"SELECT on_behalf_of, payload FROM {quote_identifier(table)} FINAL WHERE type = {{t:String}}",
            parameters={"t": command_type}).result_rows:
        fields = json.loads(payload)
        found.setdefault(str(subject), []).extend([fields["to_address"], fields["body"]])
    return found


@pytest.fixture
def service(settings: Settings, tmp_path: Path) -> Iterator[Service]:
    own = settings.model_copy(update={"data_dir": tmp_path, "clickhouse_dsn": f"chdb://{tmp_path / 'chdb'}"})
    ensure_local_keys(own)  # personal fields are sealed with this test's own keys
    running = Service(own, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def test_analysts_query_without_a_failure_while_the_projector_follows_rebuilds_rolls_back_and_erases(
        service: Service) -> None:
    service.keel_ok("tenants", "create", TENANT, "--no-kafka")
    agent = service.api_key("agent:support-bot", "support-agent")
    analyst = service.api_key("human:ana-lyst", "analyst")
    service.start()
    engine = service.engine()  # the owner published its address and answers
    settings = service.settings

    stream = Stream(service.base, agent)
    seen = Observations()
    timings: list[str] = []
    loops = [Loop("gateway-queries", gateway_queries(service.base, analyst, seen)),
             *(Loop(f"cli-queries-{n}", cli_queries(service, seen)) for n in range(CLI_LOOPS))]
    try:
        stream.start()
        service.until(lambda: analyst_count(service, analyst, "SELECT count() FROM refund_totals") > 0,
                      "no refund reached the projection")
        for loop in loops:
            loop.start()
        service.until(lambda: min(seen.runs.values()) >= 3, "the query loops did not get going")
        began = time.monotonic()
        before = seen.last_count_before(began)

        # Maintenance, one process after another, while the stream and the queries go on.
        for args in MAINTENANCE:
            started = time.monotonic()
            service.keel_ok(*args)
            timings.append(f"{' '.join(args[1:])}: {time.monotonic() - started:.1f}s")
        erased_ids = stream.retire(GONE)
        assert erased_ids, "no story of the customer to erase was acknowledged"
        pending = set(erased_ids)

        def all_decided() -> bool:
            pending.difference_update([c for c in list(pending) if _decided(service, agent, c)])
            return not pending
        service.until(all_decided, lambda: f"{len(pending)} commands for {GONE} were never decided")
        started = time.monotonic()
        erased = service.keel_ok("subjects", "erase", "--tenant", TENANT, "--subject", GONE,
                                 "--actor", "human:dpo-alice", "--reason", "GDPR art. 17 request")
        timings.append(f"erase: {time.monotonic() - started:.1f}s")
        assert "redacted" in erased, erased
        with stream.lock:
            story = stream.aggregates[1]  # cust-ana's first
        state = json.loads(service.keel_ok("state", "--tenant", TENANT, "--aggregate", story, "--at", "1",
                                           "--json"))
        assert [e["type"] for e in state["events"]] == ["SubscriptionStarted"], state

        service.until(lambda: min(seen.runs.values()) >= MIN_RUNS,
                      f"the query loops ran fewer than {MIN_RUNS} times")
    finally:
        stream.finish()
        for loop in loops:
            loop.finish()
        print(f"maintenance {timings}; queries {seen.runs}, {len(seen.failures)} failed; "
              f"{sum(len(v) for v in stream.accepted.values())} commands", *seen.failures[:20], sep="\n")

    assert stream.refused == [], f"the gateway refused commands: {stream.refused[:5]}"
    assert seen.failures == [], f"{len(seen.failures)} queries failed:\n" + "\n".join(seen.failures[:20])
    assert min(seen.runs.values()) >= MIN_RUNS, seen.runs

    # The projection catches up with the topics: each event and each command exactly once.
    expected_events = topic_ids(settings, Topic.EVENTS)
    service.until(lambda: sorted(projected_ids(engine, "events")) == sorted(expected_events),
                  lambda: f"events projection != events topic ({len(expected_events)} records): "
                          f"{_difference(projected_ids(engine, 'events'), expected_events)}", wait_s=60)
    expected_commands = topic_ids(settings, Topic.COMMANDS)
    service.until(lambda: set(projected_ids(engine, "commands")) == set(expected_commands),
                  lambda: f"commands projection != commands topic ({len(set(expected_commands))} ids): "
                          f"{_difference(projected_ids(engine, 'commands'), expected_commands)}", wait_s=60)

    after = analyst_count(service, analyst, "SELECT count() FROM events")
    assert after == len(expected_events), (after, len(expected_events))
    cli = json.loads(service.keel_ok("query", "--tenant", TENANT, "--format", "json", CLI_QUERY))
    assert cli["rows"][0][0] == len(expected_events), (cli, len(expected_events))
    assert before <= after, (before, after)

    # Only the erased customer's personal fields read ⟨erased⟩; everyone else's stay sealed.
    for table, command_type in (("events", "EmailQueued"), ("commands", "SendEmail")):
        found = personal_fields(engine, table, command_type)
        assert found.get(GONE) and all(value == ERASED for value in found[GONE]), (table, found.get(GONE))
        others = [value for customer in CUSTOMERS for value in found.get(customer, [])]
        assert others and all(value.startswith(SEALED_PREFIX) for value in others), (table, others[:5])
    engine.close()


def _decided(service: Service, token: str, command_id: str) -> bool:
    answer = httpx.get(f"{service.base}/v1/commands/{command_id}", headers={"Authorization": f"Bearer {token}"},
                       timeout=10)
    return answer.status_code == 200 and answer.json().get("status") in {"executed", "rejected", "dead_lettered"}


def _difference(projected: list[uuid.UUID], expected: list[uuid.UUID]) -> str:
    have, want = set(projected), set(expected)
    return (f"{len(projected)} rows, {len(have)} ids; {len(want - have)} missing, {len(have - want)} extra, "
            f"{len(projected) - len(have)} repeated")
