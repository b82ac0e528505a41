"""The gateway's batching on a real SQLite outbox: one loop turn's requests are admitted
together and written in arrival order, each gets its own answer, and a transaction never
holds more than ``gateway_batch_max`` commands."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind
from keel.domain.principal import Principal
from keel.errors import KeelError
from keel.gateway.admission import Admission
from keel.gateway.writer import BatchWriter, Write
from keel.outbox.db import open_database
from keel.outbox.models import Accepted, NewCommand
from keel.outbox.store import OutboxStore

pytestmark = pytest.mark.integration

BOT = Principal(tenant_id="acme", actor=Actor(kind=ActorKind.AGENT, id="bot"), roles=frozenset({"agent"}))


class RecordingStore(OutboxStore):
    """The real store, noting the size of every transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__(open_database(f"sqlite:///{path}"))
        self.migrate()
        self.transactions: list[int] = []

    def accept(self, commands: Sequence[NewCommand]) -> list[Accepted]:
        self.transactions.append(len(commands))
        return super().accept(commands)


class RecordingWriter(BatchWriter):
    """The real writer, noting how many commands each hand-over carried."""

    handovers: list[int]

    def write(self, writes: Sequence[Write]) -> None:
        self.handovers.append(len(writes))
        super().write(writes)


def body(aggregate: str, **overrides: object) -> bytes:
    return json.dumps({"id": str(uuid.uuid4()), "type": "IssueRefund", "aggregate_id": aggregate,
                       "payload": {"amount_cents": 5, "currency": "EUR", "reason": "r"}, **overrides}).encode()


async def send(admission: Admission, raw: bytes) -> Accepted:
    return await admission.admit(raw, BOT)


def test_one_turns_requests_are_admitted_together_and_answered_one_by_one(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "outbox.sqlite3")
    writer = RecordingWriter(store, max_batch=512)
    writer.handovers = []
    admission = Admission(EnvelopeCodec(), writer, max_age_s=0)
    bodies = [body(f"sub-{i}") for i in range(20)]
    bodies.insert(5, b"{not json")
    bodies.insert(12, body("sub-x", type="Nope"))

    async def burst() -> list[Accepted | BaseException]:
        return await asyncio.gather(*(send(admission, raw) for raw in bodies), return_exceptions=True)

    try:
        answers = asyncio.run(burst())
    finally:
        writer.close()
    refused = {i: a.code for i, a in enumerate(answers) if isinstance(a, KeelError)}
    assert refused == {5: "malformed_json", 12: "unknown_type"}
    accepted = [a for a in answers if isinstance(a, Accepted)]
    assert len(accepted) == 20 and not any(a.replayed or a.conflict for a in accepted)
    assert writer.handovers == [20]  # one hand-over for the whole turn
    written = [row.command_id for row in OutboxStore(open_database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
                                                     ).unsent(100)]
    assert written == [a.command_id for a in accepted]  # in arrival order


def test_a_transaction_never_holds_more_than_the_batch_limit(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "outbox.sqlite3")
    writer = BatchWriter(store, max_batch=7)
    admission = Admission(EnvelopeCodec(), writer, max_age_s=0)

    async def waves() -> list[Accepted]:
        answers: list[Accepted] = []
        for size in (30, 3, 11):
            answers += await asyncio.gather(*(send(admission, body(f"sub-{i}")) for i in range(size)))
        return answers

    try:
        answers = asyncio.run(waves())
    finally:
        writer.close()
    assert len(answers) == 44 and len({a.command_id for a in answers}) == 44
    assert max(store.transactions) <= 7 and sum(store.transactions) == 44
    assert [r.command_id for r in store.unsent(100)] == [a.command_id for a in answers]
