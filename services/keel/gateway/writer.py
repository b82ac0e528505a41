"""Group commit: concurrent requests share one outbox transaction (and one fsync).

Why by hand: the acknowledgement must wait for the durable write, and one transaction
per request caps a gateway at the disk's fsync rate. One writer thread drains a queue
into batches; each request's future resolves when its batch commits.
"""

from __future__ import annotations

import asyncio
import queue
import threading

from keel.outbox.models import Accepted, NewCommand
from keel.outbox.store import OutboxStore

_Item = tuple[NewCommand, asyncio.Future[Accepted], asyncio.AbstractEventLoop]


class BatchWriter:
    """Writes commands to the outbox in batches from one thread."""

    def __init__(self, store: OutboxStore, max_batch: int) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._thread.start()

    async def accept(self, command: NewCommand) -> Accepted:
        """Accept one command; returns once its transaction has committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Accepted] = loop.create_future()
        self._queue.put((command, future, loop))
        return await future

    def close(self) -> None:
        """Finish the queued batches and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self.store.db.close()  # this thread's connection
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            try:
                outcomes: list[Accepted | Exception] = list(self.store.accept([c for c, _, _ in batch]))
            except Exception as exc:  # noqa: BLE001 - every waiter learns why, none hangs
                outcomes = [exc] * len(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Accepted], Accepted | Exception]]] = {}
            for (_, future, loop), outcome in zip(batch, outcomes, strict=True):
                by_loop.setdefault(loop, []).append((future, outcome))
            for loop, settled in by_loop.items():  # one wake-up of each loop per batch, not per request
                loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[Accepted], Accepted | Exception]]) -> None:
    for future, outcome in settled:
        if future.done():
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
