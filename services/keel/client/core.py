"""Every request the client makes, built and parsed once for the sync and the async client.

A ``Call`` is what to send and how to read the answer; the clients only carry it over
their own ``httpx`` transport. Nothing here does I/O, so both clients behave alike.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from keel.client.errors import RequestRefused
from keel.client.models import AcceptedResponse, Action, ActionList, ApprovalList, Explanation, PendingApproval
from keel.errors import KeelError
from keel.outbox.models import CommandRecord

if TYPE_CHECKING:
    from pandas import DataFrame  # type: ignore[import-untyped]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and the parser of its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str | int | float] | None = None
    body: Any = None
    timeout: httpx.Timeout | None = None
    """None: the client's own."""

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        """The request on ``http`` (its base URL, key and timeouts)."""
        return http.build_request(self.method, self.path, params=self.params, json=self.body,
                                  timeout=httpx.USE_CLIENT_DEFAULT if self.timeout is None else self.timeout)


def answer(response: httpx.Response) -> Any:
    """The JSON body of a success; a ``RequestRefused`` naming the gateway's error otherwise."""
    refuse(response)
    return response.json()


def refuse(response: httpx.Response) -> None:
    """Raise ``RequestRefused`` with the gateway's ``{"error": {...}}`` unless ``response`` succeeded
    (its body must be read)."""
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        code, where, message = error.get("code"), error.get("field"), str(error.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        code, where, message = None, None, response.text[:500] or response.reason_phrase
    raise RequestRefused(message, code=code, field=where, status=response.status_code,
                         request=f"{response.request.method} {response.request.url.path}")


def submit(command_type: str, aggregate_id: str, payload: Mapping[str, Any], command_id: uuid.UUID | None,
           envelope: Mapping[str, Any]) -> Call[AcceptedResponse]:
    body = {**envelope, "id": str(command_id or uuid.uuid4()), "type": command_type,
            "aggregate_id": aggregate_id, "payload": dict(payload)}
    return Call("POST", "/v1/commands", _model(AcceptedResponse), body=body)


def actions() -> Call[list[Action]]:
    return Call("GET", "/v1/actions", lambda response: ActionList.model_validate(answer(response)).actions)


def explain(command_type: str, aggregate_id: str, payload: Mapping[str, Any],
            envelope: Mapping[str, Any]) -> Call[Explanation]:
    body = {**envelope, "type": command_type, "aggregate_id": aggregate_id, "payload": dict(payload)}
    return Call("POST", "/v1/explain", _model(Explanation), body=body)


def status(command_id: uuid.UUID) -> Call[CommandRecord]:
    return Call("GET", f"/v1/commands/{command_id}", _model(CommandRecord))


def approvals() -> Call[list[PendingApproval]]:
    return Call("GET", "/v1/approvals", lambda response: ApprovalList.model_validate(answer(response)).approvals)


def approve(command_id: uuid.UUID, comment: str | None, decision_id: uuid.UUID | None) -> Call[AcceptedResponse]:
    return _decide(command_id, "approve", decision_id, comment=comment)


def reject(command_id: uuid.UUID, reason: str, decision_id: uuid.UUID | None) -> Call[AcceptedResponse]:
    return _decide(command_id, "reject", decision_id, reason=reason)


def _decide(command_id: uuid.UUID, verdict: str, decision_id: uuid.UUID | None, **fields: Any
            ) -> Call[AcceptedResponse]:
    """A decision on the parked ``command_id``; ``decision_id`` makes it idempotent."""
    body = {**fields, "id": None if decision_id is None else str(decision_id)}
    return Call("POST", f"/v1/approvals/{command_id}/{verdict}", _model(AcceptedResponse), body=body)


def query(sql: str, limit: int, timeout_s: float, client_timeout_s: float) -> Call[DataFrame]:
    """``GET /v1/query`` answered as an Arrow IPC stream, read into a DataFrame; the answer may
    take as long as the query may run."""
    return Call("GET", "/v1/query", _frame, params={"sql": sql, "format": "arrow", "limit": limit,
                                                     "timeout": timeout_s},
                timeout=httpx.Timeout(client_timeout_s, read=timeout_s + client_timeout_s))


def stream(command_id: uuid.UUID, window_s: float, timeout_s: float) -> tuple[str, dict[str, float], httpx.Timeout]:
    """Path, parameters and timeouts of one window of the command's record stream: reads may
    pause for the whole window, so the read timeout covers it."""
    return (f"/v1/commands/{command_id}/stream", {"timeout_s": window_s},
            httpx.Timeout(timeout_s, read=window_s + timeout_s))


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.model_validate(answer(response))


def _frame(response: httpx.Response) -> DataFrame:
    refuse(response)
    media = response.headers.get("content-type", "")
    if not media.startswith(ARROW_STREAM):
        raise KeelError(f"GET /v1/query answered {media or 'no media type'}, not {ARROW_STREAM}",
                        code="unexpected_media_type")
    from pyarrow import ipc  # type: ignore[import-untyped]  # here: only queries pay for pyarrow and pandas

    return ipc.open_stream(response.content).read_all().to_pandas()
