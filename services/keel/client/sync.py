"""``KeelClient``: the gateway for one API key, over blocking HTTP.

Each method carries one of ``keel.client.core``'s calls; ``AsyncKeelClient`` carries the
same calls with ``await``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import httpx
from httpx_sse import connect_sse

from keel.client import core
from keel.client.models import AcceptedResponse, Action, CommandRecord, Explanation, PendingApproval
from keel.client.waiting import Waiting

if TYPE_CHECKING:
    from pandas import DataFrame  # type: ignore[import-untyped]

T = TypeVar("T")


class KeelClient:
    """The gateway at ``base_url``, as the holder of ``api_key`` sees it.

    Refusals raise ``RequestRefused`` with the gateway's code, field and message.
    """

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 10.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {api_key}"})
        self._timeout_s = timeout_s

    def _run(self, call: core.Call[T]) -> T:
        return call.parse(self._http.send(call.request(self._http)))

    def submit(self, command_type: str, aggregate_id: str, payload: Mapping[str, Any], *,
               command_id: uuid.UUID | None = None, **envelope: Any) -> AcceptedResponse:
        """Send a command; the gateway answers once it is durable. The same ``command_id`` again
        (after a lost answer) is told the first result instead of acting twice. ``envelope``
        takes the envelope's other fields (``on_behalf_of``, ``delegation``…); tenant and
        actor come from the key."""
        return self._run(core.submit(command_type, aggregate_id, payload, command_id, envelope))

    def actions(self) -> list[Action]:
        """The domains' command types this key may send under its tenant's current policy."""
        return self._run(core.actions())

    def explain(self, command_type: str, aggregate_id: str, payload: Mapping[str, Any],
                **envelope: Any) -> Explanation:
        """What governance would decide for this command now (allow, confirm, approve, deny or
        refused, with the rule and code); nothing is sent and no rate limit is spent."""
        return self._run(core.explain(command_type, aggregate_id, payload, envelope))

    def status(self, command_id: uuid.UUID) -> CommandRecord:
        """The command's record now: status, events, effects and ``summary``."""
        return self._run(core.status(command_id))

    def wait(self, command_id: uuid.UUID, until: str | None = None, timeout_s: float = 60.0) -> CommandRecord:
        """The command's record once it reaches ``until`` (a status or an effect state) or, by
        default, once it is settled (``keel.client.waiting``), following its stream.

        Raises ``EndedOtherwise`` when it ends elsewhere and ``WaitTimedOut`` after ``timeout_s``.
        """
        waiting = Waiting(command_id, until, timeout_s)
        while (window := waiting.window()) is not None:
            path, params, timeout = core.stream(command_id, window, self._timeout_s)
            with connect_sse(self._http, "GET", path, params=params, timeout=timeout) as source:
                if source.response.is_error:
                    source.response.read()
                    core.refuse(source.response)
                for sent in source.iter_sse():
                    if (record := waiting.saw(sent.event, sent.data)) is not None:
                        return record
        raise waiting.timed_out()

    def approvals(self) -> list[PendingApproval]:
        """The commands of the key's tenant waiting for an approval or a confirmation, oldest first."""
        return self._run(core.approvals())

    def approve(self, command_id: uuid.UUID, comment: str | None = None, *,
                decision_id: uuid.UUID | None = None) -> AcceptedResponse:
        """Approve (or, as its subject, confirm) a parked command. The answer's id is the
        decision's: its record tells whether the processor let this key decide."""
        return self._run(core.approve(command_id, comment, decision_id))

    def reject(self, command_id: uuid.UUID, reason: str, *,
               decision_id: uuid.UUID | None = None) -> AcceptedResponse:
        """Reject a parked command; the answer's id is the decision's, as for ``approve``."""
        return self._run(core.reject(command_id, reason, decision_id))

    def query(self, sql: str, *, limit: int = 1000, timeout_s: float = 30.0) -> DataFrame:
        """One read-only SELECT over the tenant's projections (the key needs the analyst role),
        as a pandas DataFrame read from the gateway's Arrow stream."""
        return self._run(core.query(sql, limit, timeout_s, self._timeout_s))

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
