"""The console's rendering: every value a page shows is escaped, times read as people say them,
and no template names a type of its own (it renders whatever the records hold)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from keel.domain.envelope import Actor, ActorKind, DelegationLink
from keel.domain.events import ApprovalKind
from keel.domain.principal import Principal
from keel.gateway.pending import PendingApproval
from keel.gateway.console.pages import fragment, templates
from keel.gateway.console.sessions import ConsoleSession

HOSTILE = '<script>alert("x")</script>'
SESSION = ConsoleSession(principal=Principal(tenant_id="acme", actor=Actor(kind=ActorKind.HUMAN, id="ann")),
                         key_id="0123456789abcdef", csrf_token="token-1", expires_at=time.time() + 60)


def _waiting(**changes: object) -> PendingApproval:
    values: dict[str, object] = {
        "command_id": uuid.uuid4(), "command_type": "DoThing", "aggregate_id": "thing-1",
        "actor": Actor(kind=ActorKind.AGENT, id="bot"), "on_behalf_of": HOSTILE,
        "delegation": (DelegationLink(actor=Actor(kind=ActorKind.HUMAN, id="lea"), reason=HOSTILE),),
        "policy_rule": "big", "policy_version": "v1", "approval_kind": ApprovalKind.APPROVAL, "confidence": 0.5,
        "payload": {"note": HOSTILE, "nested": {"k": [1, 2]}, "secret": "⟨sealed⟩"},
        "requested_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
        "expires_at": datetime.now(UTC) + timedelta(hours=2)}
    return PendingApproval.model_validate({**values, **changes})


def test_the_inbox_escapes_every_value_and_shows_the_context() -> None:
    shown = fragment("_approvals.html", SESSION, items=[_waiting()])
    assert HOSTILE not in shown and "&lt;script&gt;" in shown
    for part in ("DoThing", "agent:bot", "human:lea", "big", "v1", "50%", "⟨sealed⟩", '{&#34;k&#34;: [1, 2]}',
                 "5 min ago", "in 1 h", 'value="token-1"', 'for="comment-', "1 waiting"):
        assert part in shown, part


def test_an_empty_inbox_says_so_and_errors_read_as_sentences() -> None:
    assert "Nothing waits for a decision." in fragment("_approvals.html", SESSION, items=[])
    from keel.gateway.console.errors import NotFoundHere

    page = fragment("error.html", SESSION, error=NotFoundHere(f"no command {HOSTILE}"), status_code=404)
    assert "No command &lt;script&gt;" in page and "<h1>Not found</h1>" in page


def test_every_template_compiles() -> None:
    names = templates.list_templates()
    assert {"base.html", "inbox.html", "_approvals.html", "command.html", "switches.html", "audit.html"} <= set(names)
    for name in names:
        templates.get_template(name)
