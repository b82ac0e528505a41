"""Several effect workers in one process (``keel effects run --workers N``), run and stopped together.

Each worker has its own thread, event loop, consumer and producer, and is a member of the
group in its own right. When one fails, the others stop too and the failure is raised, so
that ``keel.supervision.resilient`` builds the whole set afresh.
"""

from __future__ import annotations

import threading

from keel.config import Settings
from keel.effects.worker import EffectWorker
from keel.supervision.progress import Progress


class EffectWorkerGroup:
    """``count`` effect workers named ``<instance>-<n>`` (just ``instance`` when there is one)."""

    def __init__(self, settings: Settings, instance: str, count: int, progress: Progress) -> None:
        self.workers: list[EffectWorker] = []
        try:
            for n in range(count):
                name = instance if count == 1 else f"{instance}-{n}"
                self.workers.append(EffectWorker(settings, instance_id=name, progress=progress))
        except BaseException:  # a broker away at start: leave nothing running behind
            self.close()
            raise

    def run(self, stop: threading.Event) -> None:
        """Run every worker until ``stop`` is set or one of them fails (then raise its error)."""
        halt = threading.Event()
        errors: list[BaseException] = []

        def member(worker: EffectWorker) -> None:
            try:
                worker.run(halt)
            except BaseException as exc:  # noqa: BLE001 - raised again below, in the caller's thread
                errors.append(exc)
                halt.set()

        threads = [threading.Thread(target=member, args=(worker,), name=f"effect-worker-{worker.instance}")
                   for worker in self.workers]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            if stop.wait(0.1):
                halt.set()
        if errors:
            raise errors[0]

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
