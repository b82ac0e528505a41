"""The command processor's CPU per command, without Kafka.

``processor.py`` measures the whole worker against a broker, where other work on the
machine moves the figures. This harness runs, on one core, exactly what a worker does per
command: ``handle`` (decode, validate, govern, decide) and ``decided_records`` (seal and
encode the events for the events topic and the audit intake), on the reference
workload's refunds under the benchmark's tenant policies, with personal fields sealed
against a throwaway key store. Changes to the hot path can so be compared on a noisy
machine. Run: ``.venv/bin/python benchmarks/processor_cpu.py [--commands N] [--story] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import STORY_LENGTH, reference_commands
from processor import policy_commands
from keel.config import Settings
from keel.supervision import collector
from keel.domain.envelope import Envelope
from keel.domain.governance.controls import Controls
from keel.domain.governance.ratelimit import RateLimiter
from keel.domain.messages import CommandRejected
from keel.processor.handler import Decided, Governance, handle
from keel.processor.state import BatchView, PartitionState
from keel.processor.worker import Chunk, Outputs, decided_records
from keel.sdk.producer import PRINCIPAL_TENANT_HEADER
from keel.trust.codec import SealingCodec
from keel.trust.fields import FieldCipher
from keel.trust.keystore import MasterKey
from keel.trust.keystore_sqlite import SqliteKeyStore

PARTITIONS = 6
REFUND_STEPS = (1, 2)  # a story's refunds: one the domain accepts, one it rejects

# value, key, headers, partition: one commands-topic record as the worker sees it.
Record = tuple[bytes, bytes, dict[str, bytes], int]
# topic, value, key, partition, headers: one record the worker produces.
Produced = tuple[str, bytes | None, bytes | None, int, Any]


class Worker:
    """A processor worker's deciding part: state, governance, codec; no consumer, no producer."""

    def __init__(self, codec: SealingCodec, batch_size: int) -> None:
        self.codec = codec
        self.batch_size = batch_size
        window_s = Settings().processor_dedupe_window_s
        self.partitions = {p: PartitionState.keeping_ids_for(window_s) for p in range(PARTITIONS)}
        self.governance = Governance(Controls(), RateLimiter())
        self.outputs = Outputs.of(Settings())
        self.decided: list[list[Envelope]] = []  # each decision's events, counted after the timing

    def record(self, command: Envelope) -> Record:
        """``command`` encoded as the SDK producer sends it (sealed, with the principal header)."""
        key = command.key.encode()
        return (self.codec.encode(command), key, {PRINCIPAL_TENANT_HEADER: command.tenant_id.encode()},
                zlib.crc32(key) % PARTITIONS)

    def run(self, records: list[Record]) -> list[Produced]:
        """Decide ``records`` in batches, each committed to the state as the worker does after its transaction;
        returns the records the worker would produce."""
        produced: list[Produced] = []
        for start in range(0, len(records), self.batch_size):
            view = BatchView(self.partitions)
            now = datetime.now(UTC)
            chunk = Chunk()
            thrown: list[tuple[str, bytes | None]] = []
            batch = records[start:start + self.batch_size]
            self.codec.prefetch(value for value, _, _, _ in batch)  # as the worker reads a batch's keys
            for value, key, headers, partition in batch:
                outcome = handle(value, key, headers, partition, view, self.codec, self.governance, now)
                if not isinstance(outcome, Decided):
                    raise SystemExit(f"expected a decision, got {outcome}")
                decided_records(outcome.decision, self.codec, self.outputs, key, partition, chunk)
                thrown += outcome.decision.controls
                self.decided.append(outcome.decision.events)
            produced += chunk.take(self.outputs.audit_intake)  # the intake bundled, as the worker hands it on
            view.commit(now.timestamp())
            for control_key, control_value in thrown:
                self.governance.controls.apply(control_key, control_value)
        return produced

    def events(self) -> Counter[str]:
        """The decided events by type (a rejection by its code): counted here, not in ``run``, whose
        time and instructions are the worker's alone."""
        return Counter(_label(e) for events in self.decided for e in events)


def _label(event: Envelope) -> str:
    """The event's type, or the code of a rejection: what the run's summary counts."""
    return event.payload.code if isinstance(event.payload, CommandRejected) else event.type


@contextmanager
def workload(commands: int, *, story: bool, batch_size: int) -> Iterator[tuple[Worker, list[Record]]]:
    """A worker with the policies and (unless ``story``) the subscriptions decided, and the records
    to time: about ``commands`` refunds, or whole stories (sealed e-mails included)."""
    steps = range(STORY_LENGTH) if story else REFUND_STEPS
    aggregates = max(1, commands // len(steps))
    reference = reference_commands(aggregates)
    by_step = [reference[s * aggregates:(s + 1) * aggregates] for s in range(STORY_LENGTH)]
    with tempfile.TemporaryDirectory() as folder, \
            SqliteKeyStore(Path(folder) / "keys.db", MasterKey(os.urandom(32))) as keys:
        worker = Worker(SealingCodec(FieldCipher(keys)), batch_size)
        worker.run([worker.record(c) for c in policy_commands()])
        if not story:
            worker.run([worker.record(c) for c in by_step[0]])
        timed = [worker.record(c) for s in steps for c in by_step[s]]
        worker.decided.clear()
        gc.collect()
        collector.settle()  # as the worker does after loading its partitions
        yield worker, timed


def main() -> None:
    """Set up policies and subscriptions, then time the refunds (or whole stories) and print µs/command."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commands", type=int, default=20_000, help="timed commands (about)")
    parser.add_argument("--batch-size", type=int, default=Settings().processor_batch_size)
    parser.add_argument("--story", action="store_true", help="time whole stories (incl. sealed e-mails)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile top of the timed part")
    parser.add_argument("--sort", default="tottime", help="the profile's order (pstats key: tottime, cumulative, …)")
    parser.add_argument("--top", type=int, default=25, help="lines of the profile to print")
    args = parser.parse_args()
    with workload(args.commands, story=args.story, batch_size=args.batch_size) as (worker, timed):
        profile = cProfile.Profile() if args.profile else None
        started = time.process_time()
        if profile is not None:
            profile.runcall(worker.run, timed)
        else:
            worker.run(timed)
        cpu = time.process_time() - started
    events = worker.events()
    print(f"{len(timed):,} commands, {sum(events.values()):,} events {dict(events)}")
    print(f"{cpu / len(timed) * 1e6:.1f} µs CPU per command{' (profiled)' if profile else ''}")
    if profile is not None:
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
