"""The web console over plain HTTP (no browser): sessions, CSRF and bad input, against a real gateway
(uvicorn, SQLite outbox) whose commands the relay, processor and status tracker move in the
background; the session table also on PostgreSQL.

The browser story (approve in Chromium, see the effect succeed) is ``tests/e2e/test_console_browser.py``.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import pytest

from keel.config import Settings
from keel.domain.envelope import Actor, ActorKind
from keel.gateway.app import create_app
from keel.gateway.console.sessions import SessionStore
from keel.gateway.settings import IngressSettings
from keel.outbox.db import Database, open_database
from keel.outbox.models import CommandRecord, CommandStatus
from keel.outbox.store import OutboxStore
from keel.processor.worker import CommandProcessor
from keel.relay.relay import Relay
from keel.relay.tracker import StatusTracker
from keel.client import KeelClient
from keel.security.keys import KeyStore
from tests.helpers import AGENT
from tests.platform import put_in_force, serving, sqlite_outbox

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ANN, BO = Actor(kind=ActorKind.HUMAN, id="ann"), Actor(kind=ActorKind.HUMAN, id="bo")
POLICY = {"version": "console-1", "roles": {"agent": ["IssueRefund", "StartSubscription"], "admin": ["*"]},
          "grants": {"agent:support-bot": ["agent"], "human:ann": ["admin"], "human:bo": ["admin"]},
          "rules": [{"name": "big", "decision": "approve", "match": {"payload": {"amount_cents": {"gt": 100_000}}}}]}
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Console:
    url: str
    store: OutboxStore
    keys: KeyStore
    tokens: dict[str, str]

    def browser(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def signed_in(self, who: str) -> tuple[httpx.Client, str]:
        """A client signed in as ``who``, and its session's CSRF token."""
        client = self.browser()
        answer = client.post("/console/sign-in", data={"key": self.tokens[who], "csrf_token": sign_in_csrf(client)})
        assert answer.status_code == 303, answer.text
        page = client.get("/console")
        assert page.status_code == 200, page.text
        return client, CSRF.findall(page.text)[0]

    def record(self, command_id: uuid.UUID) -> CommandRecord:
        found = self.store.get("acme", command_id)
        assert found is not None
        return found

    def until(self, command_id: uuid.UUID, status: CommandStatus) -> CommandRecord:
        deadline = time.monotonic() + 30
        while (record := self.store.get("acme", command_id)) is None or record.status is not status:
            assert time.monotonic() < deadline, f"{command_id} is {record and record.status}, not {status}"
            time.sleep(0.1)
        return record


def sign_in_csrf(client: httpx.Client) -> str:
    form = client.get("/console/sign-in")
    assert form.status_code == 200
    return cast(str, CSRF.findall(form.text)[0])


@pytest.fixture
def console(settings: Settings, tmp_path: Path) -> Iterator[Console]:
    """acme under POLICY and globex, a gateway on a free port, and relay, processor and tracker pumping."""
    processor = CommandProcessor(settings, instance_id="console")
    put_in_force(settings, processor, POLICY)
    outbox = sqlite_outbox(tmp_path, "acme", "globex")
    dsn, db, store, keys = outbox.dsn, outbox.store.db, outbox.store, outbox.keys
    tokens = {"bot": keys.create_key("acme", AGENT)[1], "ann": keys.create_key("acme", ANN)[1],
              "bo": keys.create_key("acme", BO)[1], "globex-ann": keys.create_key("globex", ANN)[1],
              "service": keys.create_key("acme", Actor(kind=ActorKind.SERVICE, id="billing"))[1]}
    ingress = IngressSettings(outbox_dsn=dsn, gateway_key_cache_s=0)
    relay, tracker = Relay(store, settings, ingress), StatusTracker(store, settings)
    stopping = threading.Event()

    def pump() -> None:
        while not stopping.is_set():
            relay.run_once()
            processor.run_until_caught_up()
            tracker.run_once(0.1)

    pumping = threading.Thread(target=pump, name="pump")
    pumping.start()
    try:
        with serving(create_app(settings.model_copy(update={"data_dir": tmp_path}), ingress)) as url:
            yield Console(url, store, keys, tokens)
    finally:
        stopping.set()
        pumping.join(30)
        relay.close()
        tracker.close()
        processor.close()
        db.close()


def parked(console: Console, amount: int = 500_000) -> uuid.UUID:
    """A refund on a new subscription, parked by the rule ``big``."""
    aggregate = f"sub-{uuid.uuid4().hex[:8]}"
    with KeelClient(console.url, console.tokens["bot"]) as bot:
        bot.submit("StartSubscription", aggregate, {"customer_id": "cust-1", "plan": "pro",
                                                    "monthly_price_cents": 900_000, "currency": "EUR"},
                   on_behalf_of="cust-1")
        refund = bot.submit("IssueRefund", aggregate, {"amount_cents": amount, "currency": "EUR", "reason": "outage",
                                                       "confidence": 0.62}, on_behalf_of="cust-1").command_id
    console.until(refund, CommandStatus.PENDING_APPROVAL)
    return refund


def test_a_person_signs_in_into_a_server_side_session_and_out_again(console: Console) -> None:
    client = console.browser()
    assert client.get("/console").headers["location"] == "/console/sign-in?ended=1"  # signed out: sign in first
    answer = client.post("/console/sign-in", data={"key": console.tokens["ann"], "csrf_token": sign_in_csrf(client)})
    assert (answer.status_code, answer.headers["location"]) == (303, "/console")
    cookie = next(value for name, value in answer.headers.multi_items() if name == "set-cookie"
                  and value.startswith("keel_console="))
    assert {"httponly", "samesite=strict", "path=/console"} <= {part.strip().lower() for part in cookie.split(";")}
    assert "secure" not in cookie.lower()  # plain HTTP here; over TLS it is Secure (below)
    token = client.cookies["keel_console"]
    assert console.tokens["ann"] not in cookie and token not in console.tokens["ann"]
    with console.store.db.transaction() as cursor:
        rows = cursor.query("SELECT token_hash, key_id FROM keel_console_sessions")
    assert rows == [(hashlib.sha256(token.encode()).hexdigest(), console.tokens["ann"].split("_")[1])]

    page = client.get("/console")
    assert page.status_code == 200 and "human:ann" in page.text and "acme" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    csrf = CSRF.findall(page.text)[0]
    assert client.post("/console/sign-out").status_code == 403  # sign-out is a change: CSRF too
    assert client.post("/console/sign-out", data={"csrf_token": csrf}).status_code == 303
    with console.store.db.transaction() as cursor:
        assert cursor.query("SELECT COUNT(*) FROM keel_console_sessions") == [(0,)]
    stale = httpx.Client(base_url=console.url, cookies={"keel_console": token})
    assert stale.get("/console").headers["location"] == "/console/sign-in?ended=1"

    tls = console.browser()  # uvicorn takes the scheme from a proxy on 127.0.0.1 that terminated TLS
    over_tls = tls.post("/console/sign-in", data={"key": console.tokens["ann"], "csrf_token": sign_in_csrf(tls)},
                        headers={"X-Forwarded-Proto": "https"})
    assert over_tls.status_code == 303 and "; secure" in over_tls.headers["set-cookie"].lower()


def test_agent_service_unknown_keys_and_a_foreign_sign_in_form_are_refused_clearly(console: Console) -> None:
    client = console.browser()
    csrf = sign_in_csrf(client)
    for who, status, says in (("bot", 403, "agent support-bot: the console is for people"),
                              ("service", 403, "service billing: the console is for people")):
        answer = client.post("/console/sign-in", data={"key": console.tokens[who], "csrf_token": csrf})
        assert answer.status_code == status and says in answer.text, answer.text
    forged = console.tokens["ann"][:-4] + "AAAA"
    for key in (forged, "not-a-key", ""):
        answer = client.post("/console/sign-in", data={"key": key, "csrf_token": csrf})
        says = "Paste your" if not key else "unknown, malformed or revoked"
        assert answer.status_code == 401 and says in answer.text
    other = console.browser()  # a form posted from elsewhere: no sign-in cookie, or another one
    for data in ({"key": console.tokens["ann"]}, {"key": console.tokens["ann"], "csrf_token": csrf}):
        answer = other.post("/console/sign-in", data=data)
        assert answer.status_code == 403 and "sign-in form" in answer.text
    assert "keel_console" not in client.cookies and "keel_console" not in other.cookies


def test_stale_forged_expired_and_revoked_sessions_go_back_to_sign_in(console: Console) -> None:
    client, _ = console.signed_in("ann")
    forged = httpx.Client(base_url=console.url, cookies={"keel_console": "x" * 43}, timeout=30)
    for path in ("/console", "/console/switches", f"/console/commands/{uuid.uuid4()}"):
        assert forged.get(path).headers["location"] == "/console/sign-in?ended=1"
    htmx = forged.get("/console/inbox", headers={"HX-Request": "true"})
    assert htmx.status_code == 401 and "sign in again" in htmx.text
    assert forged.post("/console/switches", headers={"HX-Request": "true"}).status_code == 401
    assert forged.get("/console/inbox/events", headers={"Accept": "text/event-stream"}).status_code == 401

    with console.store.db.transaction() as cursor:  # the session outlived its expiry
        cursor.execute("UPDATE keel_console_sessions SET expires_at = ?", (time.time() - 1,))
    assert client.get("/console").status_code == 303

    client, _ = console.signed_in("bo")
    assert client.get("/console").status_code == 200
    console.keys.revoke(console.tokens["bo"].split("_")[1])  # a revoked key ends its sessions
    assert client.get("/console").headers["location"] == "/console/sign-in?ended=1"


def test_the_inbox_shows_the_context_and_a_decision_is_made_once(console: Console) -> None:
    refund = parked(console)
    ann, ann_csrf = console.signed_in("ann")
    bo, bo_csrf = console.signed_in("bo")
    page = ann.get("/console").text
    for shown in ("IssueRefund", "agent:support-bot", "cust-1", "big", "console-1", "62%", "500000", "outage",
                  str(refund), 'sse-connect="/console/inbox/events"'):
        assert shown in page, shown
    fragment = ann.get("/console/inbox")
    assert fragment.status_code == 200 and str(refund) in fragment.text and "<html" not in fragment.text

    approved = ann.post(f"/console/approvals/{refund}/approve", headers={"HX-Request": "true"},
                        data={"comment": "known outage", "csrf_token": ann_csrf})
    assert approved.status_code == 200 and "Approved" in approved.text, approved.text
    console.until(refund, CommandStatus.EXECUTED)
    again = bo.post(f"/console/approvals/{refund}/approve", data={"csrf_token": bo_csrf})
    assert again.status_code == 409 and "already decided" in again.text and "not_pending" in again.text
    granted = [event for event in console.record(refund).events if event.type == "ApprovalGranted"]
    assert len(granted) == 1
    assert str(refund) not in ann.get("/console/inbox").text
    timeline = ann.get(f"/console/commands/{refund}")
    assert timeline.status_code == 200 and 'data-status="executed"' in timeline.text and "Undo" in timeline.text
    too_long = ann.post(f"/console/commands/{refund}/undo", data={"reason": "x" * 1001, "csrf_token": ann_csrf})
    assert too_long.status_code == 422 and "at most 1000" in too_long.text
    undone = ann.post(f"/console/commands/{refund}/undo", data={"reason": "goods returned", "csrf_token": ann_csrf})
    assert undone.status_code == 200 and "Undone." in undone.text, undone.text
    pending_one = parked(console)
    not_yet = ann.post(f"/console/commands/{pending_one}/undo", data={"reason": "no", "csrf_token": ann_csrf})
    assert not_yet.status_code == 409 and "only an executed command can be undone" in not_yet.text


def test_without_the_csrf_token_nothing_changes(console: Console) -> None:
    refund = parked(console)
    ann, csrf = console.signed_in("ann")
    for data, headers in (({"comment": "ok"}, {}), ({"comment": "ok", "csrf_token": "wrong"}, {}),
                          ({"comment": "ok"}, {"X-CSRF-Token": "wrong", "HX-Request": "true"})):
        for decision in ("approve", "reject"):
            answer = ann.post(f"/console/approvals/{refund}/{decision}", data=data, headers=headers)
            assert answer.status_code == 403 and "security token (CSRF)" in answer.text, answer.text
    switched = ann.post("/console/switches", data={"scope": "agent", "target": "support-bot", "engaged": "true",
                                                   "reason": "x"})
    assert switched.status_code == 403
    assert ann.post(f"/console/commands/{refund}/undo", data={"reason": "x"}).status_code == 403
    time.sleep(1)  # anything sent would have been decided by now
    assert console.record(refund).status is CommandStatus.PENDING_APPROVAL
    assert str(refund) in ann.get("/console/inbox").text
    with_header = ann.post(f"/console/approvals/{refund}/reject", data={"comment": "no"},
                           headers={"X-CSRF-Token": csrf, "HX-Request": "true"})  # htmx sends it as a header
    assert with_header.status_code == 200 and "Rejected" in with_header.text
    console.until(refund, CommandStatus.REJECTED)


def test_bad_input_gets_a_clear_error_and_changes_nothing(console: Console) -> None:
    refund = parked(console)
    ann, csrf = console.signed_in("ann")
    other, other_csrf = console.signed_in("globex-ann")
    assert str(refund) not in other.get("/console").text
    unknown = uuid.uuid4()
    answers = {name: other.post(f"/console/approvals/{wanted}/approve", data={"csrf_token": other_csrf})
               for name, wanted in (("foreign", refund), ("unknown", unknown))}
    assert {answer.status_code for answer in answers.values()} == {404}
    assert answers["foreign"].text.replace(str(refund), "ID") == answers["unknown"].text.replace(str(unknown), "ID")
    assert other.get(f"/console/commands/{refund}").status_code == 404
    assert other.get(f"/console/commands/{refund}/live").status_code == 404
    assert ann.get("/console/commands/not-a-uuid").status_code == 404
    assert ann.post("/console/approvals/not-a-uuid/approve", data={"csrf_token": csrf}).status_code == 404

    long = ann.post(f"/console/approvals/{refund}/approve", data={"comment": "x" * 1001, "csrf_token": csrf})
    assert long.status_code == 422 and "at most 1000" in long.text
    empty = ann.post(f"/console/approvals/{refund}/reject", data={"comment": " ", "csrf_token": csrf})
    assert empty.status_code == 422 and "required" in empty.text
    flood = ann.post(f"/console/approvals/{refund}/approve", content=b"comment=" + b"x" * 70_000,
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert flood.status_code == 413
    bad_switch = ann.post("/console/switches", data={"scope": "planet", "target": "x", "engaged": "true",
                                                     "reason": "x", "csrf_token": csrf})
    assert bad_switch.status_code == 422
    time.sleep(1)
    assert console.record(refund).status is CommandStatus.PENDING_APPROVAL
    assert console.store.rejections("globex") == []


def test_kill_switches_engage_and_release_with_a_reason(console: Console) -> None:
    ann, csrf = console.signed_in("ann")
    assert "None: every agent" in ann.get("/console/switches").text
    engaged = ann.post("/console/switches", data={"scope": "agent", "target": "support-bot", "engaged": "true",
                                                  "reason": "runaway refunds", "csrf_token": csrf})
    assert engaged.status_code == 200 and "is switched off" in engaged.text, engaged.text
    assert 'name="target" value="support-bot"' in engaged.text
    released = ann.post("/console/switches", data={"scope": "agent", "target": "support-bot", "engaged": "false",
                                                   "reason": "fixed", "csrf_token": csrf})
    assert released.status_code == 200 and "None: every agent" in released.text
    audit = ann.get("/console/audit")  # no chainer runs here: the page says so rather than failing
    assert audit.status_code in (200, 503) and "Audit" in audit.text


def test_the_sse_stream_sends_the_list_as_it_changes(console: Console) -> None:
    ann, _ = console.signed_in("ann")
    with ann.stream("GET", "/console/inbox/events", headers={"Accept": "text/event-stream"}) as stream:
        lines = stream.iter_lines()
        _, first = _event(lines)
        assert "Nothing waits" in first
        refund = parked(console)
        shown, second = _event(lines)
        assert str(refund) in second
    # A reconnect names the list it shows: the stream sends nothing until that list changes.
    with ann.stream("GET", "/console/inbox/events", headers={"Accept": "text/event-stream",
                                                             "Last-Event-ID": shown}) as stream:
        later = parked(console)
        _, third = _event(stream.iter_lines())
        assert str(refund) in third and str(later) in third


def _event(lines: Iterator[str]) -> tuple[str, str]:
    """The id and data of the next ``approvals`` event."""
    ident, data = "", []
    for line in lines:
        if line.startswith("id: "):
            ident = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            return ident, "\n".join(data)
    raise AssertionError("the stream ended")


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    dsn = (f"sqlite:///{tmp_path / 'outbox.sqlite3'}" if request.param == "sqlite"
           else str(request.getfixturevalue("postgres_dsn")))
    db = open_database(dsn)
    OutboxStore(db).migrate()
    yield db
    db.close()


def test_the_session_table_works_on_both_engines(database: Database) -> None:
    keys = KeyStore(database)
    keys.create_tenant("acme")
    key, _ = keys.create_key("acme", ANN, frozenset({"approver"}))
    sessions, again = SessionStore(database), SessionStore(database, ttl_s=-1)  # two processes: one table
    token, csrf = sessions.open(key.key_id)
    found = sessions.find(token)
    assert found is not None and (found.principal.actor, found.principal.roles, found.csrf_token) == (
        ANN, frozenset({"approver"}), csrf)
    expired, _ = again.open(key.key_id)
    assert again.find(expired) is None and sessions.find("forged") is None and sessions.find(None) is None
    sessions.close(token)
    assert sessions.find(token) is None
    live, _ = sessions.open(key.key_id)
    keys.revoke(key.key_id)
    assert sessions.find(live) is None
    with database.transaction() as cursor:
        assert token not in str(cursor.query("SELECT * FROM keel_console_sessions"))
