"""The web console in a real headless Chromium, against every real process (gateway, relay,
processor, effect worker, chainer, provider simulator): an approver signs in, sees a parked
$5,000 refund arrive live with its whole context, approves it and watches it executed and
paid; a second approver's late click changes nothing; an approver of another tenant can
neither see nor act on it; a change without the CSRF token is refused.

One platform and one browser serve the module's tests; each person browses in a context
(cookie jar) of their own. Playwright drives Debian's Chromium (``/usr/bin/chromium``): no
browser is downloaded. The inbox screenshot is taken on every run; with
``KEEL_UPDATE_SCREENSHOTS=1`` it replaces the README's ``docs/img/console-inbox.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from keel.client import KeelClient
from keel.config import Settings
from keel.domain.effects import idempotency_key
from keel.domain.envelope import Actor, ActorKind
from keel.outbox.db import open_database
from keel.security.keys import KeyStore
from keel.testing.provider import ProviderSimulator
from tests.conftest import own_topics
from tests.platform import running_platform


CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")
ANN, BO = Actor(kind=ActorKind.HUMAN, id="ann.admin"), Actor(kind=ActorKind.HUMAN, id="bo.admin")
POLICY = {"version": "console-story-1",
          "roles": {"support-agent": ["StartSubscription", "IssueRefund"], "admin": ["*"]},
          "grants": {"agent:support-bot": ["support-agent"], "human:ann.admin": ["admin"], "human:bo.admin": ["admin"]},
          "rules": [{"name": "refunds-over-1000-need-an-admin", "decision": "approve",
                     "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}}}]}
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "console-inbox.png"
TIMEOUT_MS = 60_000


@dataclass
class Console:
    url: str
    tokens: dict[str, str]
    provider: ProviderSimulator
    browser: Browser

    def person(self, who: str, javascript: bool = True) -> Page:
        """A new browser context (its own cookies) signed in as ``who``, on the inbox."""
        context: BrowserContext = self.browser.new_context(viewport={"width": 1200, "height": 900},
                                                           java_script_enabled=javascript, base_url=self.url)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.goto("/console")
        expect(page).to_have_url(re.compile(r"/console/sign-in"))  # signed out: the sign-in form
        page.get_by_label("API key").fill(self.tokens[who])
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Approvals", exact=True)).to_be_visible()
        return page

    def agent(self) -> KeelClient:
        return KeelClient(self.url, self.tokens[AGENT.id])

    def park(self) -> uuid.UUID:
        """A $5,000 refund the agent asks for on behalf of a customer, delegated by a support lead."""
        subscription = f"sub-{uuid.uuid4().hex[:6]}"
        with self.agent() as agent:
            opened = agent.submit("StartSubscription", subscription, {
                "customer_id": "cust-7", "plan": "pro", "monthly_price_cents": 1_000_000, "currency": "USD"},
                on_behalf_of="cust-7")
            agent.wait(opened.command_id, until="executed", timeout_s=90)
            return agent.submit("IssueRefund", subscription, {
                "amount_cents": 500_000, "currency": "USD", "reason": "double charge after the outage",
                "confidence": 0.62}, on_behalf_of="cust-7", delegation=[{
                    "actor": {"kind": "human", "id": "lea.lead"}, "reason": "customer asked for a refund"}]).command_id

    def status(self, command_id: uuid.UUID) -> str:
        with self.agent() as agent:
            return str(agent.status(command_id).status)


@pytest.fixture(scope="module")
def console(broker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"the browser tests need Debian's Chromium at {CHROMIUM}: apt-get install chromium "
                    "(.ci/run installs it)")
    tmp = tmp_path_factory.mktemp("console")
    with own_topics(broker_settings) as settings, running_platform(
            settings, tmp, (AGENT, ANN, BO), POLICY,
            extra=lambda _gateway: {"chainer": ["chain", "--no-supervise", "--instance", "c1"]}) as platform, \
            sync_playwright() as playwright:
        db = open_database(f"sqlite:///{tmp / 'outbox.sqlite3'}")
        keys = KeyStore(db)
        keys.create_tenant("globex")  # another tenant, in the same outbox, with an approver of its own
        tokens = {**platform.tokens, "globex": keys.create_key("globex", Actor(kind=ActorKind.HUMAN, id="gil"),
                                                               frozenset({"admin"}))[1]}
        db.close()
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield Console(platform.gateway, tokens, platform.provider, browser)
        finally:
            browser.close()


def test_an_approver_approves_a_parked_refund_live_and_a_late_second_click_changes_nothing(console: Console) -> None:
    ann = console.person(ANN.id)
    refund = console.park()
    card = ann.locator(f"#approval-{refund}")
    expect(card).to_be_visible()  # arrived over SSE: the page was not reloaded
    for shown in ("IssueRefund", "agent:support-bot", "cust-7", "human:lea.lead", "customer asked for a refund",
                  "refunds-over-1000-need-an-admin", "console-story-1", "62%", "500000", "USD",
                  "double charge after the outage", "expires in"):
        expect(card).to_contain_text(shown)
    # Bo opened the inbox too, in a browser without JavaScript: his page stays as it was loaded.
    bo = console.person(BO.id, javascript=False)
    expect(bo.locator(f"#approval-{refund}")).to_be_visible()

    shot = ann.screenshot(full_page=True)
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
    if os.environ.get("KEEL_UPDATE_SCREENSHOTS") == "1":
        README_SCREENSHOT.write_bytes(shot)

    card.get_by_label(re.compile("Comment")).fill("Checked the ticket: double charge confirmed.")
    card.get_by_role("button", name="Approve").click()
    notice = ann.locator("#notices")
    expect(notice).to_contain_text("Approved:")
    expect(card).to_have_count(0)  # gone from the live list once the processor executed it

    notice.get_by_role("link", name=re.compile("^Follow IssueRefund")).click()
    expect(ann.locator("[data-status]").first).to_have_attribute("data-status", "executed")
    expect(ann.locator("tr[data-effect-state]")).to_have_attribute("data-effect-state", "succeeded")  # htmx polls
    expect(ann.locator("tr[data-effect-state]")).to_contain_text("payments")

    bo.locator(f"#approval-{refund}").get_by_role("button", name="Approve").click()  # a plain form POST
    expect(bo.get_by_role("alert")).to_contain_text("already decided")
    expect(bo.get_by_role("alert")).to_contain_text("not_pending")

    with console.agent() as agent:
        record = agent.status(refund)
    assert [event.type for event in record.events].count("ApprovalGranted") == 1
    [issued] = [event for event in record.events if event.type == "RefundIssued"]
    performed = console.provider.performed()
    assert performed[idempotency_key(issued.event_id)].count == 1, "the provider must be charged exactly once"

    for _ in range(60):  # the chainer follows the processor a moment behind
        ann.reload()
        if ann.locator(".timeline").count():
            break
        ann.wait_for_timeout(1000)
    expect(ann.locator(".timeline")).to_contain_text("ApprovalGranted")
    expect(ann.locator(".timeline")).to_contain_text("Checked the ticket")

    ann.get_by_label(re.compile("Why it must be undone")).fill("The bank reversed the double charge itself.")
    ann.get_by_role("button", name="Undo").click()
    expect(ann.locator("#undo-result")).to_contain_text("Undone.")
    for _ in range(60):  # the compensation joins the command's timeline
        ann.reload()
        if ann.locator(".timeline > li.undoes").count():
            break
        ann.wait_for_timeout(1000)
    expect(ann.locator(".timeline > li.undoes")).to_contain_text("The bank reversed the double charge itself.")
    ann.context.close()
    bo.context.close()


def test_an_approver_of_another_tenant_can_neither_see_nor_act_on_it(console: Console) -> None:
    refund = console.park()
    gil = console.person("globex")
    expect(gil.locator("#approvals-count")).to_have_text("Nothing waits for a decision.")
    expect(gil.locator(f"#approval-{refund}")).to_have_count(0)

    gil.goto(f"/console/commands/{refund}")  # by URL
    expect(gil.get_by_role("heading", name="Not found")).to_be_visible()
    gil.goto("/console")
    csrf = gil.locator("input[name=csrf_token]").first.get_attribute("value")
    for decision in ("approve", "reject"):  # by form, with his own valid session and token
        answer = gil.request.post(f"/console/approvals/{refund}/{decision}",
                                  form={"csrf_token": str(csrf), "comment": "mine now"})
        assert answer.status == 404 and "No request for a decision" in answer.text()
    assert console.status(refund) == "pending_approval"
    ann = console.person(ANN.id)
    expect(ann.locator(f"#approval-{refund}")).to_be_visible()
    gil.context.close()
    ann.context.close()


def test_a_change_without_the_csrf_token_is_refused_and_changes_nothing(console: Console) -> None:
    refund = console.park()
    ann = console.person(ANN.id)
    expect(ann.locator(f"#approval-{refund}")).to_be_visible()
    for form in ({"comment": "ok"}, {"comment": "ok", "csrf_token": "forged"}):
        answer = ann.request.post(f"/console/approvals/{refund}/approve",
                                  form=cast(dict[str, str | float | bool], form))  # ann's own session cookie
        assert answer.status == 403 and "CSRF" in answer.text()
    ann.reload()
    expect(ann.locator(f"#approval-{refund}")).to_be_visible()
    assert console.status(refund) == "pending_approval"

    card = ann.locator(f"#approval-{refund}")  # the page's own form carries the token: a rejection works,
    card.get_by_label(re.compile("Comment")).fill("Not without the customer's bank statement.")
    ann.keyboard.press("Tab")  # from the keyboard alone
    ann.keyboard.press("Tab")
    expect(card.get_by_role("button", name="Reject")).to_be_focused()
    ann.keyboard.press("Enter")
    expect(ann.locator("#notices")).to_contain_text("Rejected:")
    expect(card).to_have_count(0)
    assert console.status(refund) == "rejected"
    ann.context.close()


def test_every_input_has_a_label_and_the_audit_chain_verifies(console: Console) -> None:
    refund = console.park()
    ann = console.person(ANN.id)
    expect(ann.locator(f"#approval-{refund}")).to_be_visible()
    for path in ("/console", "/console/switches", f"/console/commands/{refund}", "/console/audit"):
        if path != "/console":
            ann.goto(path)
        unlabelled = ann.eval_on_selector_all("input:not([type=hidden]), textarea, select",
                                              "found => found.filter(e => !e.labels.length).map(e => e.outerHTML)")
        assert unlabelled == [], path
    expect(ann.locator("[data-verdict]")).to_have_attribute("data-verdict", "ok")  # the audit page, last
    ann.context.close()
