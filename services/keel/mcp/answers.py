"""What the MCP tools answer: the gateway's records and refusals, shaped for an agent.

Pure functions over the SDK's models, so the tool shapes are tested without a server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from pydantic import BaseModel, Field
from pydantic import ValidationError as ArgumentsError

from keel.domains.model import Domain
from keel.effects.progress import EffectState, WaitReason
from keel.errors import ValidationError
from keel.outbox.models import CommandRecord, CommandStatus, Summary

MAX_WAIT_S = 30.0
"""The longest ``get_action_status`` waits: a tool call that hangs longer stalls the agent's turn."""



class EffectView(BaseModel):
    """One effect of the command: what carries its event to the outside world."""

    event_type: str | None
    provider: str | None
    state: EffectState
    reason: WaitReason | None = None
    detail: str | None = None


class ActionStatus(BaseModel):
    """A command as the agent follows it: its status, then what it waits on (``summary``)."""

    command_id: uuid.UUID
    type: str
    status: CommandStatus = Field(description="accepted, published, pending_approval, executed, rejected "
                                              "or dead_lettered.")
    reason_code: str | None = Field(default=None, description="Why it was rejected, e.g. policy_denied.")
    reason: str | None = None
    summary: Summary = Field(description="state pending|running|waiting|succeeded|failed|cancelled; reason "
                                         "approval|kill_switch|breaker|backoff|no_handler while waiting; "
                                         "done once nothing more will happen.")
    events: list[str] = Field(description="The types of the events it recorded.")
    effects: list[EffectView]


def status_of(record: CommandRecord) -> ActionStatus:
    """The agent's view of ``record``."""
    return ActionStatus(command_id=record.command_id, type=record.command_type, status=record.status,
                        reason_code=record.reason_code, reason=record.reason, summary=record.summary,
                        events=[event.type for event in record.events],
                        effects=[EffectView(event_type=e.event_type, provider=e.provider, state=e.state,
                                            reason=e.reason, detail=e.detail) for e in record.effects])


def catalogue(domains: Iterable[Domain]) -> str:
    """The registered action types, one line per domain, for the tools' descriptions."""
    return "\n".join(f"- {domain.name}: " + "; ".join(
        f"{command.__name__} ({_first_line(command.__doc__)})" for command in domain.commands)
        for domain in domains if domain.commands)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().partition("\n")[0].rstrip(".")


def bad_arguments(exc: ArgumentsError) -> str:
    """Malformed tool arguments in the gateway's words: ``[schema_violation] field: problem (field: …)``."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "arguments"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return str(ValidationError(f"{where}: {first['msg']}{more}", field=where))
