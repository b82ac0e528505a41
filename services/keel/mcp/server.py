"""The MCP server: four narrow tools that forward the agent's own API key to the gateway.

Over stdio the key is the process's (``KEEL_API_KEY``); over streamable HTTP it is each
request's ``Authorization: Bearer`` header, so one server serves many agents and never
holds a tenant or an actor of its own: the gateway decides what each key may do. Errors
come back as tool errors (``isError``) that say ``[code] message (field: …)``.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import httpx
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, InputRequiredResult, ToolAnnotations
from pydantic import AnyHttpUrl, Field
from pydantic import ValidationError as ArgumentsError

from keel.domains.model import Domain
from keel.errors import KeelError
from keel.gateway.actions import ActionList, Explanation
from keel.gateway.schemas import AcceptedResponse
from keel.client.waiting import settled
from keel.mcp.answers import MAX_WAIT_S, ActionStatus, bad_arguments, catalogue, status_of
from keel.client import KeelClient

POLL_S = 0.25
"""How often ``get_action_status`` reads the record while it waits."""

ActionType = Annotated[str, Field(description="The action (command) type, as list_actions names it.")]
AggregateId = Annotated[str, Field(min_length=1, description="What the action acts on, e.g. a subscription id.")]
Payload = Annotated[dict[str, Any], Field(description="The action's fields, as its schema in list_actions says.")]
OnBehalfOf = Annotated[str | None, Field(description="The person the agent acts for, e.g. a customer id.")]


class AnyBearerKey:
    """Takes any bearer token as the caller's key: the gateway judges it on every call, so a
    second check here would only add a round trip. The client id is a digest: keys stay out of logs."""

    async def verify_token(self, token: str) -> AccessToken | None:
        return AccessToken(token=token, client_id=hashlib.sha256(token.encode()).hexdigest()[:16], scopes=[])


class KeelServer(MCPServer):
    """An MCP server whose malformed-argument errors name the field and a code, like the gateway's."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None
                        ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ArgumentsError):
                raise ToolError(bad_arguments(exc.__cause__)) from exc.__cause__
            raise


def build_server(gateway: str, domains: Iterable[Domain], *, key: str | None) -> KeelServer:
    """The server for the gateway at ``gateway``; ``key`` is the stdio agent's, None over HTTP."""
    over_http = key is None
    server = KeelServer(
        "keel", instructions="Request governed actions from Keel. Call list_actions first; explain_action "
                             "before an action you are unsure of; follow a submitted action with "
                             "get_action_status.",
        auth=AuthSettings(issuer_url=AnyHttpUrl(gateway), resource_server_url=None) if over_http else None,
        token_verifier=AnyBearerKey() if over_http else None)
    kinds = catalogue(domains)

    @contextmanager
    def client(ctx: Context) -> Iterator[KeelClient]:
        """The gateway as the caller's key sees it; its refusals become tool errors."""
        try:
            with KeelClient(gateway, _key(ctx, key)) as found:
                yield found
        except KeelError as exc:
            raise ToolError(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise ToolError(f"[gateway_unreachable] {gateway}: {exc}") from exc

    def list_actions(ctx: Context) -> ActionList:
        with client(ctx) as gw:
            return ActionList(actions=gw.actions())

    def explain_action(type: ActionType, aggregate_id: AggregateId, payload: Payload, ctx: Context,
                       on_behalf_of: OnBehalfOf = None) -> Explanation:
        with client(ctx) as gw:
            return gw.explain(type, aggregate_id, payload, **_envelope(on_behalf_of))

    def submit_action(type: ActionType, aggregate_id: AggregateId, payload: Payload, ctx: Context,
                      on_behalf_of: OnBehalfOf = None,
                      command_id: Annotated[uuid.UUID | None, Field(
                          description="Send the same id again after a lost answer: the gateway answers "
                                      "with the first result instead of acting twice.")] = None,
                      ) -> AcceptedResponse:
        with client(ctx) as gw:
            return gw.submit(type, aggregate_id, payload, command_id=command_id, **_envelope(on_behalf_of))

    def get_action_status(command_id: uuid.UUID, ctx: Context,
                          wait_s: Annotated[float, Field(ge=0, le=MAX_WAIT_S, description=(
                              "Seconds to wait for the action to finish or to wait on someone "
                              "(an approver, a kill switch, a provider)."))] = 0.0) -> ActionStatus:
        deadline = time.monotonic() + wait_s
        with client(ctx) as gw:
            record = gw.status(command_id)
            while not settled(record) and time.monotonic() < deadline:
                time.sleep(POLL_S)
                record = gw.status(command_id)
        return status_of(record)

    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    server.add_tool(list_actions, annotations=read_only, description=(
        "The actions your key may request, each with the JSON schema of its payload."))
    server.add_tool(explain_action, annotations=read_only, description=(
        "A dry run: what the tenant's policy would decide for this action (allow, confirm, approve, deny "
        "or refused), with the rule and the reason. Nothing is executed. Action types:\n" + kinds))
    server.add_tool(submit_action, annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True),
                    description=(
        "Request an action; answers its command_id and status once it is durably accepted. The policy "
        "decides later: follow it with get_action_status. Action types:\n" + kinds))
    server.add_tool(get_action_status, annotations=read_only, description=(
        "Where a submitted action is: status (executed, rejected with reason_code…), and in summary what "
        "it waits on (approval, kill_switch, breaker) and the state of its effects. wait_s waits up to "
        f"{MAX_WAIT_S:g} s for it to finish."))
    return server


def _key(ctx: Context, stdio_key: str | None) -> str:
    """The caller's API key: the request's bearer token over HTTP, the process's over stdio."""
    headers = ctx.headers
    if headers is None and stdio_key is not None:
        return stdio_key
    scheme, _, token = (headers or {}).get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise KeelError("send your API key as Authorization: Bearer <key>", code="missing_key",
                        field="header.authorization")
    return token.strip()


def _envelope(on_behalf_of: str | None) -> dict[str, Any]:
    return {} if on_behalf_of is None else {"on_behalf_of": on_behalf_of}
