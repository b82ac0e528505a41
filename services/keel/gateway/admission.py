"""Admitting the command requests of one event-loop turn back to back.

Why: validating and encoding a command (``intake.admit``) cost 77 µs per request inside
the gateway when each ran between the HTTP server's own steps, and 53 µs when run again
at once: between requests the CPU caches lose the validator's code and data. The
requests whose bodies arrived in the same turn of the loop are therefore admitted
together, in arrival order. Nobody waits for a timer or a batch size: a request alone
is admitted in the next turn.

Sealing a personal field needs its subject's data key. A key the cache does not hold is
read from the key store, and a new subject's key is created there with a durable write:
done one command at a time on the event loop, every such write stalled every request of
the worker for a disk sync. The keys a turn's commands lack are therefore fetched and
created together (``FieldCipher.prepare``), on a thread of their own, and the turn is
encoded and handed to the writer when they are there. Turns that need keys while that
thread is busy wait for it together, and their keys are then created in one go: like the
outbox writer's group commit, one disk sync serves them all.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from keel.domain.principal import Principal
from keel.gateway.intake import check, encode
from keel.gateway.writer import BatchWriter, Write
from keel.outbox.models import Accepted
from keel.trust.codec import SealingCodec

_Checked = tuple[Envelope, str, "asyncio.Future[Accepted]"]


class Admission:
    """``admit`` for many requests at once, then one hand-over of their rows to the writer.

    Each caller gets the result of its durable write, or its typed error.
    """

    def __init__(self, codec: EnvelopeCodec, writer: BatchWriter, max_age_s: float) -> None:
        self.codec = codec
        self.writer = writer
        self.max_age_s = max_age_s
        self._pending: list[tuple[bytes, Principal, str | None, asyncio.Future[Accepted]]] = []
        self._keys = ThreadPoolExecutor(1, thread_name_prefix="data-keys")  # one: the store's writes queue anyway
        self._need_keys: list[_Checked] = []  # commands of the turns waiting for the key thread
        self._fetching = False

    async def admit(self, raw: bytes, caller: Principal, traceparent: str | None = None) -> Accepted:
        """The command's ``Accepted`` once it is durable; raises what ``intake.admit`` raises,
        or the write's error.

        ``traceparent`` is the request's span (the batch runs outside every request's context).
        One future from admission to commit: the request's task wakes once, with its answer.
        """
        return await self.enqueue(raw, caller, traceparent)

    def enqueue(self, raw: bytes, caller: Principal, traceparent: str | None = None) -> asyncio.Future[Accepted]:
        """``admit`` without awaiting: the future of its result, for a caller with no task of its own."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Accepted] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._admit_pending)  # runs after the requests already scheduled this turn
        self._pending.append((raw, caller, traceparent, future))
        return future

    def close(self) -> None:
        """Stop the key thread once what it runs is done."""
        self._keys.shutdown()

    def _admit_pending(self) -> None:
        pending, self._pending = self._pending, []
        checked: list[_Checked] = []
        for raw, caller, traceparent, future in pending:
            if future.cancelled():  # the client went away
                continue
            try:
                envelope, request_hash = check(raw, caller, max_age_s=self.max_age_s, traceparent=traceparent)
            except Exception as exc:  # noqa: BLE001 - the typed KeelError, or a bug, goes to its own request
                future.set_exception(exc)
                continue
            checked.append((envelope, request_hash, future))
        if not checked:
            return
        codec = self.codec
        if isinstance(codec, SealingCodec) and not codec.cipher.prepared(envelope for envelope, _, _ in checked):
            self._need_keys += checked
            if not self._fetching:
                self._fetch_keys(codec)
        else:
            self._encode(checked)

    def _fetch_keys(self, codec: SealingCodec) -> None:
        """Fetch and create the keys of every command waiting for them, on the key thread."""
        waiting, self._need_keys = self._need_keys, []
        self._fetching = True
        keys = asyncio.get_running_loop().run_in_executor(
            self._keys, codec.cipher.prepare, [envelope for envelope, _, _ in waiting])
        keys.add_done_callback(lambda done: self._keys_fetched(done, waiting, codec))

    def _keys_fetched(self, done: asyncio.Future[None], waiting: list[_Checked], codec: SealingCodec) -> None:
        if not done.cancelled():
            done.exception()  # seen: whatever the store raised, each command's own seal raises again, to its caller
        self._fetching = False
        self._encode(waiting)
        if self._need_keys:  # turns that came meanwhile: their keys together, now
            self._fetch_keys(codec)

    def _encode(self, checked: list[_Checked]) -> None:
        writes: list[Write] = []
        for envelope, request_hash, future in checked:
            if future.cancelled():
                continue
            try:
                writes.append((encode(envelope, request_hash, self.codec), future))
            except Exception as exc:  # noqa: BLE001 - as in _admit_pending
                future.set_exception(exc)
        if writes:
            self.writer.write(writes)
