"""When an effect may run: one at a time per aggregate, in order, within concurrency limits.

``Lanes`` keeps a FIFO per aggregate and one task per non-empty FIFO, so an aggregate's
effects run in the order their events were recorded while every other aggregate goes on
beside it. ``Limits`` bounds the attempts running at once per tenant and provider, per
tenant, and overall. An attempt takes its places in that order, and only the overall one
is shared between tenants, so an attempt waiting for a place holds nothing another tenant
could use: a slow provider or a busy tenant holds up that tenant alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

J = TypeVar("J")


class Lanes(Generic[J]):
    """Per-key FIFOs of jobs; ``run`` is awaited for each job, one at a time per key."""

    def __init__(self, run: Callable[[J], Awaitable[None]]) -> None:
        self._run = run
        self._queues: dict[str, deque[J]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.queued = 0
        """Jobs added and not yet run to their end."""
        self.error: BaseException | None = None
        """The first exception a ``run`` raised: the lane it came from has stopped."""

    def add(self, key: str, job: J) -> None:
        """Queue ``job`` behind the other jobs of ``key``."""
        self.queued += 1
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            return
        self._queues[key] = deque((job,))
        task = asyncio.create_task(self._drain(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue:
                await self._run(queue[0])
                queue.popleft()
                self.queued -= 1
        except Exception as exc:  # noqa: BLE001 - kept for the worker to raise: the lane's order is broken
            log.exception("an effect lane failed")
            self.error = self.error or exc
        finally:
            del self._queues[key]

    async def close(self) -> None:
        """Cancel every lane and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Limits:
    """Places for attempts: ``per_provider`` per tenant and provider, ``per_tenant`` per tenant, ``total`` overall."""

    def __init__(self, *, total: int, per_tenant: int, per_provider: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_tenant, self._per_provider = per_tenant, per_provider
        self._tenants: dict[str, asyncio.Semaphore] = {}
        self._providers: dict[tuple[str, str], asyncio.Semaphore] = {}

    @asynccontextmanager
    async def place(self, tenant: str, provider: str) -> AsyncIterator[None]:
        """Hold a place for one attempt of ``tenant`` against ``provider``."""
        provider_place = self._providers.get((tenant, provider))
        if provider_place is None:
            provider_place = self._providers[(tenant, provider)] = asyncio.Semaphore(self._per_provider)
        tenant_place = self._tenants.get(tenant)
        if tenant_place is None:
            tenant_place = self._tenants[tenant] = asyncio.Semaphore(self._per_tenant)
        async with provider_place, tenant_place, self._total:
            yield
