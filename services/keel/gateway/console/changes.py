"""Every change the console makes is a command sent through ``submit_as``, as ``POST /v1/commands``
would take it; the processor decides it (roles, self-approval, ``not_pending``…), and the
console waits a few seconds for that decision so the person sees it, not just "sent".
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from anyio import sleep, to_thread
from starlette.datastructures import FormData

from keel.domain.principal import Principal
from keel.gateway.console.errors import BadInput, NotFoundHere, Refused
from keel.gateway.submit import Gateway, submit_as
from keel.outbox.models import TERMINAL, CommandRecord, CommandStatus

SETTLE_S = 10.0
"""How long a change waits for the processor's decision before it answers "sent, not decided yet"."""
MAX_TEXT = 1000
"""The longest comment or reason a governance command accepts."""


@dataclass(frozen=True)
class Sent:
    """A change sent: its record once the processor decided it, or as it stood when the console
    stopped waiting (None or not final: ``decided`` is False)."""

    command_id: uuid.UUID
    record: CommandRecord | None

    @property
    def decided(self) -> bool:
        return self.record is not None and self.record.status in TERMINAL


def text(form: FormData, name: str, label: str, *, required: bool, limit: int = MAX_TEXT) -> str | None:
    """The form's field ``name`` trimmed; ``BadInput`` when required and empty, or longer than ``limit``."""
    raw = form.get(name)
    value = raw.strip() if isinstance(raw, str) else ""
    if len(value) > limit:
        raise BadInput(f"the {label} has {len(value)} characters; at most {limit} are accepted. Nothing was "
                       "changed.", field=name)
    if required and not value:
        raise BadInput(f"say why: the {label} is required. Nothing was changed.", field=name)
    return value or None


def command_id(raw: str) -> uuid.UUID:
    """The id in a console address; a malformed one reads as unknown, like another tenant's."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFoundHere(f"no command {raw[:60]!r} in your tenant") from None


async def send(gw: Gateway, caller: Principal, kind: str, aggregate_id: str, payload: dict[str, Any]) -> Sent:
    """Send one command as ``caller`` and wait up to ``SETTLE_S`` for its decision.

    Raises ``Refused`` when the processor refused it, with its reason code, so a person reads
    why nothing changed.
    """
    document = {"type": kind, "aggregate_id": aggregate_id, "payload": payload}
    answer = orjson.loads(await submit_as(gw, caller, orjson.dumps(document)))
    sent = await settle(gw, caller.tenant_id, uuid.UUID(answer["command_id"]))
    if sent.record is not None and sent.record.status in (CommandStatus.REJECTED, CommandStatus.DEAD_LETTERED):
        raise Refused(refusal_text(sent.record), code=sent.record.reason_code or "refused")
    return sent


async def settle(gw: Gateway, tenant: str, sent_id: uuid.UUID, wait_s: float = SETTLE_S) -> Sent:
    """The command's record once final, or as it is after ``wait_s``."""
    deadline, record = time.monotonic() + wait_s, None
    while True:
        record = await to_thread.run_sync(gw.store.get, tenant, sent_id)
        if (record is not None and record.status in TERMINAL) or time.monotonic() > deadline:
            return Sent(sent_id, record)
        await sleep(0.2)


_WHY = {
    "not_pending": "it was already decided (or it expired) before your decision arrived",
    "self_approval": "the actor who asked for it cannot approve it",
}


def refusal_text(record: CommandRecord) -> str:
    """Why the processor refused a console change, in words first and its code after."""
    code = record.reason_code or "refused"
    why = _WHY.get(code, record.reason or "the processor refused it")
    return f"Nothing changed: {why} [{code}]."
