"""The gateway's batching on a real SQLite outbox: one loop turn's requests are admitted
together and written in arrival order, each gets its own answer, and a transaction never
holds more than ``gateway_batch_max`` commands. The data keys a turn's personal fields need
are created together, off the event loop, in a real SQLite key store."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
import uuid
from typing import Any, cast
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
from keel.trust.codec import SealingCodec
from keel.trust.fields import FieldCipher
from keel.trust.keystore import MasterKey
from keel.trust.keystore_sqlite import SqliteKeyStore
from support_desk.messages import SendEmail

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


class RecordingKeyStore(SqliteKeyStore):
    """The real key store, noting the thread of every statement that writes a key; ``sync_s``
    makes each such write take that long, as a slow disk's sync would."""

    writers: list[str]
    sync_s = 0.0

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if sql.startswith("INSERT"):
            self.writers.append(threading.current_thread().name)
            time.sleep(self.sync_s)
        return super()._rows(sql, params)


def email(aggregate: str, customer: str) -> bytes:
    return json.dumps({"id": str(uuid.uuid4()), "type": "SendEmail", "aggregate_id": aggregate,
                       "on_behalf_of": customer, "payload": {"to_address": f"{customer}@example.com",
                                                             "template": "welcome"}}).encode()


def test_a_turns_new_data_subjects_get_their_keys_together_off_the_event_loop(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "outbox.sqlite3")
    writer = BatchWriter(store, max_batch=512)
    keys = RecordingKeyStore(tmp_path / "keys.sqlite3", MasterKey(os.urandom(32)))
    keys.writers = []
    codec = SealingCodec(FieldCipher(keys))
    admission = Admission(codec, writer, max_age_s=0)
    customers = [f"cust-{i}" for i in range(25)]

    async def burst() -> list[Accepted | BaseException]:
        return await asyncio.gather(*(send(admission, email(f"sub-{i}", c)) for i, c in enumerate(customers)),
                                    send(admission, b"{not json"), return_exceptions=True)

    try:
        first = asyncio.run(burst())
        written_first = list(keys.writers)
        second = asyncio.run(burst())  # the same subjects again: their keys are cached
    finally:
        admission.close()
        writer.close()
    for answers in (first, second):
        assert isinstance(answers[-1], KeelError) and answers[-1].code == "malformed_json"
        assert all(isinstance(a, Accepted) for a in answers[:-1]), answers
    assert written_first and all(name.startswith("data-keys") for name in written_first)
    assert len(written_first) == 1  # every new subject's key in one statement
    assert keys.writers == written_first  # nothing more for subjects already keyed
    rows = store.unsent(100)
    assert len(rows) == 50
    assert b"@example.com" not in b"".join(row.value for row in rows)
    opened = [codec.decode(row.value) for row in rows]
    assert [cast(SendEmail, c.payload).to_address for c in opened] == [f"{c}@example.com" for c in customers] * 2
    keys.close()


def test_turns_that_need_keys_while_the_key_thread_is_busy_get_them_together(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "outbox.sqlite3")
    writer = BatchWriter(store, max_batch=512)
    keys = RecordingKeyStore(tmp_path / "keys.sqlite3", MasterKey(os.urandom(32)))
    keys.writers, keys.sync_s = [], 0.3
    admission = Admission(SealingCodec(FieldCipher(keys)), writer, max_age_s=0)

    async def turns() -> list[Accepted]:
        first = [asyncio.ensure_future(send(admission, email(f"sub-a{i}", f"cust-a{i}"))) for i in range(3)]
        await asyncio.sleep(0.05)  # the first turn's keys are being written
        later = [asyncio.ensure_future(send(admission, email(f"sub-b{i}", f"cust-b{i}"))) for i in range(3)]
        await asyncio.sleep(0.05)
        later += [asyncio.ensure_future(send(admission, email(f"sub-c{i}", f"cust-c{i}"))) for i in range(3)]
        return list(await asyncio.gather(*first, *later))

    try:
        answers = asyncio.run(turns())
    finally:
        admission.close()
        writer.close()
        keys.close()
    assert len(answers) == 9 and all(isinstance(a, Accepted) for a in answers)
    assert len(keys.writers) == 2  # the first turn's keys, then the two later turns' together
    assert [r.command_id for r in store.unsent(20)] == [a.command_id for a in answers]


def test_a_key_store_that_fails_refuses_each_command_with_its_error(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "outbox.sqlite3")
    writer = BatchWriter(store, max_batch=512)
    keys = RecordingKeyStore(tmp_path / "keys.sqlite3", MasterKey(os.urandom(32)))
    keys.writers = []
    keys.close()  # every statement now fails
    admission = Admission(SealingCodec(FieldCipher(keys)), writer, max_age_s=0)

    async def burst() -> list[Accepted | BaseException]:
        return list(await asyncio.gather(send(admission, email("sub-1", "cust-1")), send(admission, body("sub-2")),
                                         return_exceptions=True))

    try:
        mail, refund = asyncio.run(burst())
    finally:
        admission.close()
        writer.close()
    assert isinstance(refund, Accepted)  # no personal field: no key needed
    assert isinstance(mail, sqlite3.ProgrammingError)  # the closed store, as before
    assert [r.command_id for r in store.unsent(10)] == [refund.command_id]
