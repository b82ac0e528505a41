"""Group commit: concurrent requests share one outbox transaction (and one fsync).

Why by hand: the acknowledgement must wait for the durable write, and one transaction
per request caps a gateway at the disk's fsync rate. One writer thread drains a queue
into batches; each request's own future resolves when its batch commits (the request
waits on that one future from admission to answer, so it wakes once).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Sequence

from keel.outbox.models import Accepted, NewCommand
from keel.outbox.store import OutboxStore

Write = tuple[NewCommand, asyncio.Future[Accepted]]
_Chunk = tuple[asyncio.AbstractEventLoop, Sequence[Write]]


class BatchWriter:
    """Writes commands to the outbox in batches from one thread."""

    def __init__(self, store: OutboxStore, max_batch: int) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Chunk | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._thread.start()

    def write(self, writes: Sequence[Write]) -> None:
        """Queue commands together (one wake-up of the thread); each future, of the running
        loop, gets the command's ``Accepted`` or the write's error at its commit."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(writes), self.max_batch):
            self._queue.put((loop, writes[start:start + self.max_batch]))

    def close(self) -> None:
        """Finish the queued batches and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        held: deque[_Chunk | None] = deque()  # taken from the queue, for the next batch
        while True:
            chunk = held.popleft() if held else self._queue.get()
            if chunk is None:
                self.store.db.close()  # this thread's connection
                return
            chunks, size = [chunk], len(chunk[1])
            while size < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None or size + len(more[1]) > self.max_batch:
                    held.append(more)  # stop, or start the next batch, after this one
                    break
                chunks.append(more)
                size += len(more[1])
            self._commit(chunks)

    def _commit(self, chunks: list[_Chunk]) -> None:
        """One transaction for ``chunks``; then one wake-up of each loop with its requests' outcomes."""
        try:
            outcomes: list[Accepted] | Exception = self.store.accept(
                [command for _, writes in chunks for command, _ in writes])
        except Exception as exc:  # noqa: BLE001 - every waiter learns why, none hangs
            outcomes = exc
        settled: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Accepted], Accepted | Exception]]] = {}
        position = 0
        for loop, writes in chunks:
            mine = settled.setdefault(loop, [])
            for _, future in writes:
                mine.append((future, outcomes if isinstance(outcomes, Exception) else outcomes[position]))
                position += 1
        for loop, results in settled.items():
            loop.call_soon_threadsafe(_settle, results)


def _settle(settled: list[tuple[asyncio.Future[Accepted], Accepted | Exception]]) -> None:
    for future, outcome in settled:
        if future.done():  # the request was cancelled (its client went away)
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
