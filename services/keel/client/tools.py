"""Governed actions as agent tools: a callable with a name, a description and an argument schema.

Any agent framework can wrap a ``Tool``: it submits the action with the client's key,
waits (up to ``wait_s``) until the command is settled, and answers a plain JSON-able dict
whose ``outcome`` is ``executed`` (events and effect states), ``pending_approval`` (the
rule and who must decide), ``refused`` (code, field and reason), ``failed`` (dead
lettered), ``in_progress`` (not settled within the bound) or ``unreachable``. It never
raises for what the agent got wrong: malformed arguments are a ``refused`` answer naming
the field, so the agent can correct itself in its next turn.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as ArgumentsError

from keel.client.aio import AsyncKeelClient
from keel.client.errors import WaitTimedOut
from keel.client.models import Action, ApprovalKind, CommandRecord, CommandStatus, Explanation
from keel.client.sync import KeelClient
from keel.errors import KeelError

WAIT_S = 30.0
"""How long a tool call waits for its command to settle: longer stalls the agent's turn."""

Outcome = Literal["executed", "pending_approval", "refused", "failed", "in_progress", "unreachable"]


class Arguments(BaseModel):
    """What the agent passes to a tool: which aggregate, the payload, and for whom."""

    model_config = ConfigDict(extra="forbid")

    aggregate_id: str = Field(min_length=1)
    payload: dict[str, Any] = Field(default_factory=dict)
    on_behalf_of: str | None = Field(default=None, min_length=1)

    def envelope(self) -> dict[str, Any]:
        return {} if self.on_behalf_of is None else {"on_behalf_of": self.on_behalf_of}


class EffectResult(BaseModel):
    """One effect of an executed command: what carries its event to the outside world."""

    event_type: str | None
    provider: str | None
    state: str
    reason: str | None = None
    detail: str | None = None


class ToolResult(BaseModel):
    """What a tool call answers the agent (``shown()``: as JSON, unset fields left out)."""

    outcome: Outcome
    command_id: uuid.UUID | None = None
    status: CommandStatus | None = None
    code: str | None = Field(default=None, description="Why it was refused: schema_violation, policy_denied…")
    field: str | None = Field(default=None, description="The argument to blame, e.g. payload.amount_cents.")
    reason: str | None = None
    rule: str | None = Field(default=None, description="The policy rule that parked it.")
    decided_by: str | None = Field(default=None, description="Who must decide a parked command.")
    expires_at: str | None = None
    events: list[str] | None = None
    effects: list[EffectResult] | None = None
    done: bool | None = Field(default=None, description="Nothing more will happen to it.")

    def shown(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def parameters(action: Action) -> dict[str, Any]:
    """The JSON schema of a tool's arguments: the payload's schema under ``payload`` (its
    ``$defs`` moved to the root, where its ``$ref``s point)."""
    payload = copy.deepcopy(action.json_schema)
    defs = payload.pop("$defs", None)
    schema: dict[str, Any] = {
        "type": "object", "additionalProperties": False, "required": ["aggregate_id", "payload"],
        "properties": {
            "aggregate_id": {"type": "string", "pattern": f"^(?:{action.id_pattern})$",
                             "description": f"The {action.aggregate} it acts on."},
            "payload": payload,
            "on_behalf_of": {"type": "string", "description": "The person the agent acts for, e.g. a customer id."},
        }}
    if defs:
        schema["$defs"] = defs
    return schema


def description(action: Action) -> str:
    """The action's own description, and what governance may answer instead of running it."""
    own = action.description.strip().rstrip(".")
    return ((f"{own}. " if own else f"{action.type} on a {action.aggregate}. ")
            + "Governed by Keel: it runs at once, is refused (with a code and reason), or waits for an approval "
              "(with the rule and who decides).")


@dataclass(frozen=True, eq=False)
class Governed:
    """What a framework shows the model of one governed action: ``name``, ``description`` and
    ``parameters`` (the JSON schema of its arguments)."""

    action: Action

    @property
    def name(self) -> str:
        """The action's command type."""
        return self.action.type

    @property
    def description(self) -> str:
        return description(self.action)

    @property
    def parameters(self) -> dict[str, Any]:
        return parameters(self.action)


@dataclass(frozen=True, eq=False)
class Tool(Governed):
    """One governed action as a blocking tool: ``tool({"aggregate_id": …, "payload": {…}})``."""

    client: KeelClient = field(repr=False)
    wait_s: float = WAIT_S

    def __call__(self, arguments: Any = None, /, **named: Any) -> dict[str, Any]:
        """Submit the action and answer what became of it; ``arguments`` is a mapping or its JSON."""
        parsed = read_arguments(arguments, named)
        if isinstance(parsed, ToolResult):
            return parsed.shown()
        gw = self.client
        try:
            accepted = gw.submit(self.name, parsed.aggregate_id, parsed.payload, **parsed.envelope())
            try:
                record = gw.wait(accepted.command_id, timeout_s=self.wait_s)
            except WaitTimedOut as late:
                return in_progress(accepted.command_id, late.record).shown()
            asked = (gw.explain(self.name, parsed.aggregate_id, parsed.payload, **parsed.envelope())
                     if needs_approver(record) else None)
            return result(record, parsed, asked).shown()
        except (KeelError, httpx.HTTPError) as exc:
            return failure(exc).shown()


@dataclass(frozen=True, eq=False)
class AsyncTool(Governed):
    """One governed action as an awaitable tool: ``await tool({"aggregate_id": …, "payload": {…}})``."""

    client: AsyncKeelClient = field(repr=False)
    wait_s: float = WAIT_S

    async def __call__(self, arguments: Any = None, /, **named: Any) -> dict[str, Any]:
        """``Tool.__call__``, awaited."""
        parsed = read_arguments(arguments, named)
        if isinstance(parsed, ToolResult):
            return parsed.shown()
        gw = self.client
        try:
            accepted = await gw.submit(self.name, parsed.aggregate_id, parsed.payload, **parsed.envelope())
            try:
                record = await gw.wait(accepted.command_id, timeout_s=self.wait_s)
            except WaitTimedOut as late:
                return in_progress(accepted.command_id, late.record).shown()
            asked = (await gw.explain(self.name, parsed.aggregate_id, parsed.payload, **parsed.envelope())
                     if needs_approver(record) else None)
            return result(record, parsed, asked).shown()
        except (KeelError, httpx.HTTPError) as exc:
            return failure(exc).shown()


def tools(client: KeelClient, wait_s: float = WAIT_S) -> list[Tool]:
    """A tool for each action the client's key may send now."""
    return [Tool(action, client, wait_s) for action in client.actions()]


async def async_tools(client: AsyncKeelClient, wait_s: float = WAIT_S) -> list[AsyncTool]:
    """An awaitable tool for each action the client's key may send now."""
    return [AsyncTool(action, client, wait_s) for action in await client.actions()]


def read_arguments(arguments: Any, named: dict[str, Any]) -> Arguments | ToolResult:
    """The agent's arguments (a mapping, its JSON text, or keywords), or the refusal naming what is wrong."""
    if isinstance(arguments, str | bytes):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            return ToolResult(outcome="refused", code="schema_violation", field="arguments",
                              reason=f"arguments are not JSON: {exc}")
    if not isinstance(arguments, dict | type(None)):
        return ToolResult(outcome="refused", code="schema_violation", field="arguments",
                          reason=f"arguments must be an object, not {type(arguments).__name__}")
    try:
        return Arguments.model_validate({**(arguments or {}), **named})
    except ArgumentsError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "arguments"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return ToolResult(outcome="refused", code="schema_violation", field=where,
                          reason=f"{where}: {first['msg']}{more}")


def needs_approver(record: CommandRecord) -> bool:
    """Whether ``record`` is parked for an approver, whose roles only ``explain`` names."""
    requested = _requested(record)
    return requested is not None and requested.get("approval_kind") == ApprovalKind.APPROVAL


def result(record: CommandRecord, arguments: Arguments, asked: Explanation | None) -> ToolResult:
    """The agent's view of a settled ``record``; ``asked`` explains a command parked for an approver."""
    status, command_id = record.status, record.command_id
    if status is CommandStatus.PENDING_APPROVAL:
        requested = _requested(record) or {}
        rule = requested.get("policy_rule")
        confirming = requested.get("approval_kind") == ApprovalKind.CONFIRMATION
        who = f"subject:{arguments.on_behalf_of}" if confirming else "approver"
        why = (asked.reason if asked is not None and asked.rule == rule else
               f"policy rule {rule!r} waits for " + ("its subject to confirm it" if confirming else
                                                    "an approver to approve it"))
        return ToolResult(outcome="pending_approval", command_id=command_id, status=status, rule=rule,
                          decided_by=who, reason=why, expires_at=requested.get("expires_at"), done=False)
    if status in (CommandStatus.REJECTED, CommandStatus.DEAD_LETTERED):
        return ToolResult(outcome="refused" if status is CommandStatus.REJECTED else "failed", command_id=command_id,
                          status=status, code=record.reason_code, reason=record.reason, done=True)
    if status is CommandStatus.EXECUTED:
        summary = record.summary
        return ToolResult(outcome="executed", command_id=command_id, status=status,
                          events=[event.type for event in record.events],
                          effects=[EffectResult(event_type=e.event_type, provider=e.provider, state=e.state,
                                                reason=e.reason, detail=e.detail) for e in record.effects],
                          reason=summary.detail, done=summary.done)
    return in_progress(command_id, record)


def in_progress(command_id: uuid.UUID, record: CommandRecord | None) -> ToolResult:
    """A command not settled within the bound: the agent may look again later."""
    return ToolResult(outcome="in_progress", command_id=command_id, status=None if record is None else record.status,
                      reason="not settled yet; ask for its status later", done=False)


def failure(exc: KeelError | httpx.HTTPError) -> ToolResult:
    """A refusal by the gateway (code, field, message), or a gateway that did not answer."""
    if isinstance(exc, KeelError):
        return ToolResult(outcome="refused", code=exc.code, field=exc.field, reason=exc.message)
    return ToolResult(outcome="unreachable", code="gateway_unreachable", reason=str(exc) or type(exc).__name__)


def _requested(record: CommandRecord) -> dict[str, Any] | None:
    """The payload of ``record``'s ``ApprovalRequested`` event, if it asked for a decision."""
    return next((event.payload for event in reversed(record.events) if event.type == "ApprovalRequested"), None)
