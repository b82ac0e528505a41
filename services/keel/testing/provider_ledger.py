"""What a provider simulator has done: its idempotency keys, the actions it performed, its totals.

Bookkeeping only, no I/O, so every decision about a key is taken between two awaits and
two requests with one key can never both perform. It follows the payment APIs' rules: the
first request with a key performs and its answer is stored; a repeat with the same path
and body gets that answer back, replayed; the same key with another request is refused
(422), and so is a repeat while the first is still in progress (409). A request that
performed nothing (a 503, a refund that is not there) stores nothing, so a retry is a
first request again.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from keel.testing.provider_faults import Fault

JSONObject = dict[str, Any]

REFUNDS = "/v1/refunds"
REVERSALS = "/v1/refunds/reversals"


class PerformedAction(BaseModel):
    """One action the simulator performed, as ``GET /_control/performed`` lists it by key."""

    model_config = ConfigDict(frozen=True)

    id: str
    count: int = Field(description="How often the key's action was performed: anything but 1 is a bug.")
    path: str
    body: JSONObject
    tenant: str | None
    agent: str | None
    at: datetime
    received_at: datetime = Field(description="When the request that performed it arrived (before any delay).")


class Stats(BaseModel):
    """Totals since the last reset, as ``GET /_control/stats`` returns them."""

    requests: int = 0
    performed: int = 0
    replays: int = 0
    conflicts: int = Field(default=0, description="409 request_in_progress and 422 idempotency_key_reused.")
    rejected: int = Field(default=0, description="Other 4xx: no key, no JSON object, no such refund.")
    faults: dict[Fault, int] = Field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status and JSON body, and whether it is a stored one given again."""

    status: int
    body: bytes
    replayed: bool = False


def error(status: int, code: str, message: str) -> Answer:
    """An error answer in the shape payment APIs use: ``{"error": {"code", "message"}}``."""
    return Answer(status, orjson.dumps({"error": {"code": code, "message": message}}))


@dataclass
class _Entry:
    path: str
    body: JSONObject
    answer: Answer | None = None
    """None while the key's first request is in progress."""


class Ledger:
    """Every key the simulator has seen and every action it performed, since the last reset."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.actions: dict[str, PerformedAction] = {}
        self._entries: dict[str, _Entry] = {}
        self._counts: Counter[str] = Counter()
        self._refunds: dict[tuple[str | None, str], str] = {}
        self._ids = itertools.count(1)

    def begin(self, key: str, path: str, body: JSONObject) -> Answer | None:
        """The answer to a request that must not perform, or None once the key is this request's."""
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry(path, body)
            return None
        if (entry.path, entry.body) != (path, body):
            self.stats.conflicts += 1
            return error(422, "idempotency_key_reused",
                         f"key {key} was first used for another request to {entry.path}")
        if entry.answer is None:
            self.stats.conflicts += 1
            return error(409, "request_in_progress", f"the first request with key {key} is still in progress")
        self.stats.replays += 1
        return replace(entry.answer, replayed=True)

    def release(self, key: str) -> None:
        """Forget a key whose request performed nothing, so that a retry performs."""
        self._entries.pop(key, None)

    def reject(self, answer: Answer) -> Answer:
        """Count a refusal that keeps no key."""
        self.stats.rejected += 1
        return answer

    def perform(self, key: str, path: str, body: JSONObject, *, tenant: str | None, agent: str | None,
                received_at: datetime) -> Answer:
        """Perform the action ``begin`` gave this request and store its answer under the key."""
        echo: JSONObject = {}
        if path == REVERSALS:
            refund = self._refunds.get((tenant, str(body.get("reference"))))
            if refund is None:
                self.release(key)
                return self.reject(error(404, "refund_not_found",
                                         f"no refund with reference {body.get('reference')!r} was performed"))
            echo["refund"] = refund
        action_id, at = f"act_{next(self._ids)}", datetime.now(UTC)
        self._counts[key] += 1
        self.actions[key] = PerformedAction(id=action_id, count=self._counts[key], path=path, body=body,
                                            tenant=tenant, agent=agent, at=at, received_at=received_at)
        if path == REFUNDS and isinstance(body.get("reference"), str):
            self._refunds[(tenant, body["reference"])] = action_id
        self.stats.performed += 1
        answer = Answer(201, orjson.dumps({**body, **echo, "id": action_id, "idempotency_key": key, "path": path,
                                           "tenant": tenant, "created_at": at}))
        self._entries[key].answer = answer
        return answer

    def count(self, fault: Fault) -> None:
        """Count one injected fault."""
        self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1
