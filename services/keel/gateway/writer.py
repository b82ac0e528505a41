"""Group commit: concurrent requests share one outbox transaction (and one fsync).

Why by hand: the acknowledgement must wait for the durable write, and one transaction
per request caps a gateway at the disk's fsync rate. One writer thread drains a queue
into batches; each request's future resolves when its batch commits.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Sequence

from keel.outbox.models import Accepted, NewCommand
from keel.outbox.store import OutboxStore

_Item = tuple[NewCommand, asyncio.Future[Accepted], asyncio.AbstractEventLoop]


class BatchWriter:
    """Writes commands to the outbox in batches from one thread."""

    def __init__(self, store: OutboxStore, max_batch: int) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[list[_Item] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._thread.start()

    def write(self, commands: Sequence[NewCommand]) -> list[asyncio.Future[Accepted]]:
        """Queue commands together (one wake-up of the thread); each future resolves at its commit."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Accepted]] = [loop.create_future() for _ in commands]
        items = [(command, future, loop) for command, future in zip(commands, futures, strict=True)]
        for start in range(0, len(items), self.max_batch):
            self._queue.put(items[start:start + self.max_batch])
        return futures

    def close(self) -> None:
        """Finish the queued batches and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        held: deque[list[_Item] | None] = deque()  # taken from the queue, for the next batch
        while True:
            items = held.popleft() if held else self._queue.get()
            if items is None:
                self.store.db.close()  # this thread's connection
                return
            batch = list(items)
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None or len(batch) + len(more) > self.max_batch:
                    held.append(more)  # stop, or start the next batch, after this one
                    break
                batch += more
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
