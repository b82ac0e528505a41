"""``AsyncKeelClient``: ``KeelClient``'s methods, awaited, for agents that run an event loop.

It carries the same ``keel.client.core`` calls over ``httpx.AsyncClient``; see
``KeelClient`` for what each method does.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import httpx
from httpx_sse import aconnect_sse

from keel.client import core
from keel.client.models import AcceptedResponse, Action, CommandRecord, Explanation, PendingApproval
from keel.client.waiting import Waiting

if TYPE_CHECKING:
    from pandas import DataFrame  # type: ignore[import-untyped]

T = TypeVar("T")


class AsyncKeelClient:
    """The gateway at ``base_url``, as the holder of ``api_key`` sees it, without blocking the loop."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 10.0) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout_s,
                                       headers={"Authorization": f"Bearer {api_key}"})
        self._timeout_s = timeout_s

    async def _run(self, call: core.Call[T]) -> T:
        return call.parse(await self._http.send(call.request(self._http)))

    async def submit(self, command_type: str, aggregate_id: str, payload: Mapping[str, Any], *,
                     command_id: uuid.UUID | None = None, **envelope: Any) -> AcceptedResponse:
        return await self._run(core.submit(command_type, aggregate_id, payload, command_id, envelope))

    async def actions(self) -> list[Action]:
        return await self._run(core.actions())

    async def explain(self, command_type: str, aggregate_id: str, payload: Mapping[str, Any],
                      **envelope: Any) -> Explanation:
        return await self._run(core.explain(command_type, aggregate_id, payload, envelope))

    async def status(self, command_id: uuid.UUID) -> CommandRecord:
        return await self._run(core.status(command_id))

    async def wait(self, command_id: uuid.UUID, until: str | None = None, timeout_s: float = 60.0
                   ) -> CommandRecord:
        waiting = Waiting(command_id, until, timeout_s)
        while (window := waiting.window()) is not None:
            path, params, timeout = core.stream(command_id, window, self._timeout_s)
            async with aconnect_sse(self._http, "GET", path, params=params, timeout=timeout) as source:
                if source.response.is_error:
                    await source.response.aread()
                    core.refuse(source.response)
                async for sent in source.aiter_sse():
                    if (record := waiting.saw(sent.event, sent.data)) is not None:
                        return record
        raise waiting.timed_out()

    async def approvals(self) -> list[PendingApproval]:
        return await self._run(core.approvals())

    async def approve(self, command_id: uuid.UUID, comment: str | None = None, *,
                      decision_id: uuid.UUID | None = None) -> AcceptedResponse:
        return await self._run(core.approve(command_id, comment, decision_id))

    async def reject(self, command_id: uuid.UUID, reason: str, *,
                     decision_id: uuid.UUID | None = None) -> AcceptedResponse:
        return await self._run(core.reject(command_id, reason, decision_id))

    async def query(self, sql: str, *, limit: int = 1000, timeout_s: float = 30.0) -> DataFrame:
        return await self._run(core.query(sql, limit, timeout_s, self._timeout_s))

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
