"""A small typed HTTP client for agents: send commands to the gateway and follow what became of them.

An agent holds one API key (``keel keys create``) and talks to the gateway only: it asks
what it may send (``GET /v1/actions``) and what governance would say to a command
(``POST /v1/explain``), sends a command (``POST /v1/commands``), reads its record
(``GET /v1/commands/{id}``: status, events, effects and a ``summary`` of what it waits
on), or waits for a state by following the record's server-sent events
(``GET /v1/commands/{id}/stream``) instead of polling. An approver lists what waits for a
decision (``GET /v1/approvals``) and approves or rejects it.
Refusals are ``RequestRefused`` with the gateway's own error code; a wait that cannot end
as asked is ``EndedOtherwise`` or ``WaitTimedOut``, each holding the last record seen.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import httpx
from httpx_sse import connect_sse

from keel.effects.progress import EffectState
from keel.errors import KeelError, ValidationError
from keel.gateway.actions import Action, ActionList, Explanation
from keel.gateway.approvals import ApprovalList, PendingApproval
from keel.gateway.schemas import AcceptedResponse
from keel.outbox.models import TERMINAL, CommandRecord, CommandStatus

MAX_STREAM_S = 600.0
"""The longest stream the gateway serves; longer waits reconnect."""


class RequestRefused(KeelError):
    """The gateway refused a request: ``code`` is its error code, ``status`` the HTTP status."""

    code = "request_refused"

    def __init__(self, message: str, *, code: str | None, field: str | None, status: int) -> None:
        super().__init__(message, code=code, field=field)
        self.status = status


class EndedOtherwise(KeelError):
    """The command or its effects reached a final state other than the one waited for."""

    code = "ended_otherwise"

    def __init__(self, message: str, record: CommandRecord) -> None:
        super().__init__(message)
        self.record = record


class WaitTimedOut(KeelError):
    """The state waited for was not reached in time; ``record`` is the last one seen."""

    code = "wait_timeout"

    def __init__(self, message: str, record: CommandRecord | None) -> None:
        super().__init__(message)
        self.record = record


def target(until: str) -> CommandStatus | EffectState:
    """What ``until`` names: a command status (``executed``) or a state of the summary (``succeeded``)."""
    if until in [*CommandStatus]:
        return CommandStatus(until)
    if until in [*EffectState]:
        return EffectState(until)
    known = ", ".join([*CommandStatus, *EffectState])
    raise ValidationError(f"cannot wait until {until!r}; wait for one of {known}", code="bad_until", field="until")


def reached(record: CommandRecord, until: CommandStatus | EffectState) -> bool:
    """Whether ``record`` is where ``until`` asks; raises ``EndedOtherwise`` once it never will be.

    A command status is reached by the command; an effect state by the record's ``summary``
    (``succeeded``: executed with every effect succeeded). A final status or a done summary
    that is not the one asked for ends the wait.
    """
    if isinstance(until, CommandStatus):
        if record.status is until:
            return True
        if record.status in TERMINAL:
            raise EndedOtherwise(f"command {record.command_id} ended {record.status}, not {until}"
                                 + (f" ({record.reason_code}: {record.reason})" if record.reason_code else ""), record)
        return False
    summary = record.summary
    if summary.state is until:
        return True
    if summary.done:
        raise EndedOtherwise(f"command {record.command_id} is {record.status} and its effects ended "
                             f"{summary.state}, not {until}" + (f": {summary.detail}" if summary.detail else ""),
                             record)
    return False


class KeelClient:
    """The gateway at ``base_url``, as the holder of ``api_key`` sees it."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 10.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {api_key}"})
        self._timeout_s = timeout_s

    def submit(self, command_type: str, aggregate_id: str, payload: Mapping[str, Any], *,
               command_id: uuid.UUID | None = None, **envelope: Any) -> AcceptedResponse:
        """Send a command; the gateway answers once it is durable. Send the same ``command_id``
        again (after a lost answer) to be told the original result instead of a second command.

        ``envelope`` takes the envelope's other fields (``on_behalf_of``, ``delegation``…);
        tenant and actor come from the key.
        """
        body = {**envelope, "id": str(command_id or uuid.uuid4()), "type": command_type,
                "aggregate_id": aggregate_id, "payload": dict(payload)}
        return AcceptedResponse.model_validate(_answer(self._http.post("/v1/commands", json=body)))

    def actions(self) -> list[Action]:
        """The domains' command types this key may send under its tenant's current policy."""
        return ActionList.model_validate(_answer(self._http.get("/v1/actions"))).actions

    def explain(self, command_type: str, aggregate_id: str, payload: Mapping[str, Any],
                **envelope: Any) -> Explanation:
        """What governance would decide for this command now (allow, confirm, approve, deny or
        refused, with the rule and code); nothing is sent and no rate limit is spent."""
        body = {**envelope, "type": command_type, "aggregate_id": aggregate_id, "payload": dict(payload)}
        return Explanation.model_validate(_answer(self._http.post("/v1/explain", json=body)))

    def status(self, command_id: uuid.UUID) -> CommandRecord:
        """The command's record now."""
        return CommandRecord.model_validate(_answer(self._http.get(f"/v1/commands/{command_id}")))

    def wait(self, command_id: uuid.UUID, until: str = EffectState.SUCCEEDED, timeout_s: float = 60.0) -> CommandRecord:
        """The command's record once it reaches ``until`` (see ``reached``), following its stream.

        Raises ``EndedOtherwise`` when it ends elsewhere and ``WaitTimedOut`` after ``timeout_s``.
        """
        wanted, deadline, last = target(until), time.monotonic() + timeout_s, None
        while (remaining := deadline - time.monotonic()) > 0:
            window = min(remaining, MAX_STREAM_S)
            with connect_sse(self._http, "GET", f"/v1/commands/{command_id}/stream",
                             params={"timeout_s": window},
                             timeout=httpx.Timeout(self._timeout_s, read=window + self._timeout_s)) as source:
                if source.response.is_error:
                    source.response.read()
                    _answer(source.response)
                for sent in source.iter_sse():
                    last = CommandRecord.model_validate_json(sent.data)
                    if reached(last, wanted):
                        return last
        raise WaitTimedOut(f"command {command_id} did not reach {wanted} within {timeout_s:g} s"
                           + (f"; it is {last.status}, effects {last.summary.state}" if last else ""), last)

    def approvals(self) -> list[PendingApproval]:
        """The commands of the key's tenant waiting for an approval or a confirmation, oldest first."""
        return ApprovalList.model_validate(_answer(self._http.get("/v1/approvals"))).approvals

    def approve(self, command_id: uuid.UUID, comment: str | None = None) -> AcceptedResponse:
        """Approve (or, as its subject, confirm) a parked command; ``status`` of the answered id
        tells whether the processor let this key decide."""
        return AcceptedResponse.model_validate(_answer(self._http.post(
            f"/v1/approvals/{command_id}/approve", json={"comment": comment})))

    def reject(self, command_id: uuid.UUID, reason: str) -> AcceptedResponse:
        """Reject a parked command; ``status`` of the answered id tells whether the processor
        let this key decide."""
        return AcceptedResponse.model_validate(_answer(self._http.post(
            f"/v1/approvals/{command_id}/reject", json={"reason": reason})))

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _answer(response: httpx.Response) -> Any:
    """The JSON body of a success; a ``RequestRefused`` naming the gateway's error otherwise."""
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"code": None, "field": None, "message": response.text[:500]}
    raise RequestRefused(f"{response.request.method} {response.request.url.path} answered {response.status_code}: "
                         f"{error.get('message')}", code=error.get("code"), field=error.get("field"),
                         status=response.status_code)
