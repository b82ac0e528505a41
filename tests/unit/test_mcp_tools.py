"""The MCP tools' shapes: answers, when waiting stops, argument errors, and descriptions from the domains."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest
from mcp import Client
from pydantic import BaseModel, ValidationError

from keel.domains.registry import current
from keel.effects.progress import EffectState, WaitReason
from keel.effects.status import EffectRecord, Stage
from keel.client.waiting import settled
from keel.mcp.answers import bad_arguments, catalogue, status_of
from keel.mcp.server import build_server
from keel.outbox.models import CommandRecord, CommandStatus, TrackedEvent


def _record(status: CommandStatus, *effects: tuple[EffectState, WaitReason | None], **fields: Any) -> CommandRecord:
    command_id = uuid.uuid4()
    return CommandRecord(
        command_id=command_id, tenant_id="acme", command_type="IssueRefund", key="acme/sub-1", status=status,
        created_at=1.0, updated_at=2.0,
        events=(TrackedEvent(event_id=uuid.uuid4(), type="RefundIssued", occurred_at="now", payload={}),),
        effects=tuple(EffectRecord(tenant_id="acme", effect_id=uuid.uuid4(), aggregate_id="sub-1",
                                   origin_command_id=command_id, event_type="RefundIssued", provider="payments",
                                   generation=0, stage=Stage.REPORTED, state=state, reason=reason, updated_at=2.0)
                      for state, reason in effects), **fields)


@pytest.mark.parametrize(("record", "expected"), [
    (_record(CommandStatus.PUBLISHED), False),
    (_record(CommandStatus.PENDING_APPROVAL), True),
    (_record(CommandStatus.REJECTED, reason_code="policy_denied"), True),
    (_record(CommandStatus.EXECUTED), True),
    (_record(CommandStatus.EXECUTED, (EffectState.RUNNING, None)), False),
    (_record(CommandStatus.EXECUTED, (EffectState.WAITING, WaitReason.BACKOFF)), False),
    (_record(CommandStatus.EXECUTED, (EffectState.WAITING, WaitReason.BREAKER)), True),
    (_record(CommandStatus.EXECUTED, (EffectState.SUCCEEDED, None)), True),
])
def test_waiting_stops_once_done_or_waiting_on_someone_else(record: CommandRecord, expected: bool) -> None:
    assert settled(record) is expected


def test_the_status_answer_carries_the_summary_events_and_effects() -> None:
    answer = status_of(_record(CommandStatus.EXECUTED, (EffectState.WAITING, WaitReason.KILL_SWITCH)))
    shown = answer.model_dump(mode="json")
    assert (shown["status"], shown["summary"]["state"], shown["summary"]["reason"]) == (
        "executed", "waiting", "kill_switch")
    assert shown["events"] == ["RefundIssued"]
    assert shown["effects"] == [{"event_type": "RefundIssued", "provider": "payments", "state": "waiting",
                                 "reason": "kill_switch", "detail": None}]


def test_malformed_arguments_name_the_field_and_a_code() -> None:
    class Arguments(BaseModel):
        payload: dict[str, Any]
        wait_s: float

    with pytest.raises(ValidationError) as raised:
        Arguments.model_validate({"payload": "x", "wait_s": "soon"})
    assert bad_arguments(raised.value) == ("[schema_violation] payload: Input should be a valid dictionary "
                                           "(and 1 more) (field: payload)")


def test_the_catalogue_lists_every_domain_and_its_action_types() -> None:
    lines = catalogue(current().domains).splitlines()
    assert lines[0].startswith("- support_desk: StartSubscription (Start a subscription for a customer); ")
    assert any(line.startswith("- deploys: ") for line in lines)


def test_tool_errors_come_back_as_results_not_crashes() -> None:
    server = build_server("http://127.0.0.1:9", current().domains, key="a-key")  # nothing listens on port 9

    async def calls() -> list[tuple[bool, str]]:
        async with Client(server) as agent:
            tools = {tool.name: tool for tool in (await agent.list_tools()).tools}
            assert set(tools) == {"list_actions", "explain_action", "submit_action", "get_action_status"}
            assert "IssueRefund" in (tools["submit_action"].description or "")
            answers = [await agent.call_tool("submit_action", {"type": "IssueRefund", "aggregate_id": "s",
                                                               "payload": "x"}),
                       await agent.call_tool("get_action_status", {"command_id": str(uuid.uuid4()), "wait_s": 99}),
                       await agent.call_tool("get_action_status", {"command_id": str(uuid.uuid4())})]
            return [(answer.is_error, " ".join(getattr(b, "text", "") for b in answer.content)) for answer in answers]

    malformed, too_long, unreachable = anyio.run(calls)
    assert malformed == (True, "[schema_violation] payload: Input should be a valid dictionary (field: payload)")
    assert too_long[0] and too_long[1].startswith("[schema_violation] wait_s:")
    assert unreachable[0] and "[gateway_unreachable] http://127.0.0.1:9" in unreachable[1]
