"""Instructions per command of the processor's, the status tracker's and the gateway's hot paths, counted by callgrind.

Why: on the shared 2-core machines the CPU-time figures of two runs of the same code differ by
up to a third, so a change of a few per cent cannot be told from the drift. Instructions
retired do not drift: two runs of the same code agree within 1 %. They are not time (cache
misses and branch predictions are not counted), so the timed harnesses stay the measure of
the targets; this one says whether a change made the work smaller. Stages:

- ``processor``: the timed part of ``processor_cpu.py --story`` (decode, govern, decide, evolve,
  seal and encode; no Kafka), instrumented around the timed batches only;
- ``tracker``: the status tracker's work in ``keel relay`` (``StatusLearner.apply``: decode each event,
  learn its commands' statuses and its effect, one outbox transaction per batch of 1,000 as its
  consumer hands them over), over the events the processor stage's commands yield, on a SQLite
  outbox holding those commands; instrumented around the batches only;
- ``chainer``: the audit chainer's work per intake record in ``keel chain`` (``Chainer._append``: read
  the bundle's events, seal each as the next record of its tenant's chain, hand it to the producer,
  which here keeps nothing), over the intake records the processor stage's commands yield;
  instrumented around the records only;
- ``gateway``: a one-worker gateway (``keel gateway``, SQLite outbox) under callgrind, answering a
  closed loop of ``POST /v1/commands`` from ``--connections`` keep-alive connections after a
  warm-up; every thread of the process is counted (event loop, outbox writer, key thread).

Needs valgrind (``apt-get install valgrind``); each stage runs about 50 times slower than
natively. Run: ``.venv/bin/python benchmarks/instructions.py [--stage processor|tracker|gateway|all]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from confluent_kafka import Message, Producer

import gateway as gateway_bench
from processor_cpu import workload
from keel.config import Settings
from keel.contracts.catalog import load_catalog
from keel.outbox.db import open_database
from keel.outbox.enqueue import to_new_command
from keel.outbox.store import OutboxStore
from keel.relay.tracker import StatusLearner
from keel.trust.chainer import Chainer, TenantHead

_COLLECTED = re.compile(r"Collected : (\d+)")
TRACKER_BATCH = 1000  # records per batch: what the tracker's consumer hands over at most


def _callgrind(out: Path) -> list[str]:
    """The valgrind command line that counts instructions once switched on (``callgrind_control -i on``)."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def _instrument(pid: int, on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)], check=True, capture_output=True)


def _collected(log: str) -> int:
    found = _COLLECTED.findall(log)
    if not found:
        raise SystemExit(f"callgrind reported no count:\n{log[-2000:]}")
    return int(found[-1])


def inside_stage(name: str, commands: int, folder: Path) -> dict[str, float]:
    """Run this file under callgrind in ``--inside`` mode for stage ``name``; instructions per timed command."""
    run = subprocess.run([*_callgrind(folder / f"{name}.out"), sys.executable, __file__, "--inside", name,
                          "--commands", str(commands)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    if run.returncode:
        raise SystemExit(f"the {name} stage failed:\n{run.stderr[-2000:]}")
    counted = json.loads(run.stdout.strip().splitlines()[-1])
    return {**counted, "instructions_k": _collected(run.stderr) / counted["commands"] / 1e3}


def inside_processor(commands: int) -> dict[str, int]:
    """Under callgrind: build the workload uninstrumented, count only the timed batches."""
    with workload(commands, story=True, batch_size=5000) as (worker, timed):
        _instrument(os.getpid(), True)
        worker.run(timed)
        _instrument(os.getpid(), False)
    return {"commands": len(timed)}


class Consumed:
    """A record as a consumer hands it over: the methods of ``confluent_kafka.Message`` the tracker and
    the chainer read."""

    def __init__(self, topic: str, value: bytes | None, headers: Any, partition: int, offset: int,
                 key: bytes | None = None) -> None:
        self._topic, self._value, self._headers, self._partition, self._offset, self._key = (
            topic, value, headers, partition, offset, key)

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> Any:
        return self._headers

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None


def inside_tracker(commands: int) -> dict[str, int]:
    """Under callgrind: decide the workload and keep its commands in an outbox uninstrumented, then count
    the tracker's batches over the events."""
    with workload(commands, story=True, batch_size=5000) as (worker, timed), \
            tempfile.TemporaryDirectory() as folder:
        events_topic = worker.outputs.events
        events = [Consumed(topic, value, headers, partition, offset) for offset, (topic, value, _, partition, headers)
                  in enumerate(worker.run(timed)) if topic == events_topic]
        store = OutboxStore(open_database(f"sqlite:///{folder}/outbox.db"))
        store.migrate()
        store.accept([to_new_command(worker.codec.decode(value), value) for value, _, _, _ in timed])
        settings = Settings(topic_prefix=events_topic.rsplit(".", 1)[0])
        learner = StatusLearner(store, settings)
        if learner.events_topic != events_topic:
            raise SystemExit(f"the tracker would read {learner.events_topic}, the events are in {events_topic}")
        applied = 0
        _instrument(os.getpid(), True)
        for start in range(0, len(events), TRACKER_BATCH):
            applied += learner.apply(cast(list[Message], events[start:start + TRACKER_BATCH]))[1]
        _instrument(os.getpid(), False)
        store.db.close()
    if applied < len(events):
        raise SystemExit(f"the tracker applied {applied} outcomes for {len(events)} events")
    return {"commands": len(timed), "events": len(events)}


class Discarded:
    """The one method of ``confluent_kafka.Producer`` the chainer calls per record, keeping nothing."""

    def produce(self, *_args: Any, **_kwargs: Any) -> None:
        return None


def inside_chainer(commands: int) -> dict[str, int]:
    """Under callgrind: decide the workload uninstrumented, then count the chainer's appends of its intake
    records (a chainer without Kafka: the attributes ``_append`` reads, set as ``__init__`` would)."""
    with workload(commands, story=True, batch_size=5000) as (worker, timed):
        intake_topic = worker.outputs.audit_intake
        intake = [Consumed(topic, value, headers, partition, offset, key) for offset, (topic, value, key, partition,
                  headers) in enumerate(worker.run(timed)) if topic == intake_topic]
    chainer = object.__new__(Chainer)
    chainer.catalog, chainer.audit_topic, chainer.checkpoint_every = load_catalog(), "audit", 10**9
    chainer.partitions = {message.partition(): {} for message in intake}
    chainer._producer = cast(Producer, Discarded())
    touched: dict[tuple[int, str], TenantHead] = {}
    _instrument(os.getpid(), True)
    chained = sum(chainer._append(cast(Message, message), touched, 0.0) for message in intake)
    _instrument(os.getpid(), False)
    return {"commands": len(timed), "intake_records": len(intake), "entries": chained}


def gateway_stage(requests: int, connections: int, folder: Path) -> dict[str, float]:
    """A one-worker gateway under callgrind; instructions per accepted request of the closed loop."""
    dsn = f"sqlite:///{folder}/outbox.db"
    token = gateway_bench.agent_token(dsn)
    port = gateway_bench.free_port()
    env = {**os.environ, "KEEL_OUTBOX_DSN": dsn, "KEEL_DATA_DIR": str(folder), "KEEL_GATEWAY_KEY_CACHE_S": "3600",
           "KEEL_LOG_LEVEL": "WARNING", "PYTHONHASHSEED": "0"}
    log = folder / "gateway.log"
    server = subprocess.Popen([*_callgrind(folder / "gateway.out"), sys.executable, "-m", "keel.cli", "gateway",
                               "--port", str(port), "--workers", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        gateway_bench.wait_until_listening(port, server, log, 600)  # slow to start under valgrind
        asyncio.run(_closed_loop(port, token, connections, 300))  # imports, caches, first keys
        _instrument(server.pid, True)
        asyncio.run(_closed_loop(port, token, connections, requests))
        _instrument(server.pid, False)
    finally:
        server.terminate()
        server.wait(120)
    return {"requests": requests, "instructions_k": _collected(log.read_text()) / requests / 1e3}


async def _closed_loop(port: int, token: str, connections: int, count: int) -> None:
    """``count`` commands (each for its own aggregate), sent as fast as answers come."""
    pool = await gateway_bench.connect(port, token, connections)
    left = count

    async def send(connection: gateway_bench.Connection, lane: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            status = await connection.post(gateway_bench.body("acme", lane * 1_000_000 + left))
            if status != 202:
                raise SystemExit(f"the gateway answered {status}")

    await asyncio.gather(*(send(c, lane) for lane, c in enumerate(pool)))
    for connection in pool:
        connection.writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("processor", "tracker", "chainer", "gateway", "all"), default="all")
    parser.add_argument("--commands", type=int, default=3000, help="timed processor, tracker and chainer commands (about)")
    parser.add_argument("--requests", type=int, default=3000, help="counted gateway requests")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--inside", choices=("processor", "tracker", "chainer"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside = {"processor": inside_processor, "tracker": inside_tracker, "chainer": inside_chainer}[args.inside]
        print(json.dumps(inside(args.commands)))
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("instructions.py needs valgrind: apt-get install valgrind")
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="keel-instructions-") as folder:
        if args.stage in ("processor", "all"):
            figures["processor"] = inside_stage("processor", args.commands, Path(folder))
            print(f"processor: {figures['processor']['instructions_k']:.1f} k instructions per command "
                  f"({figures['processor']['commands']:.0f} commands, whole stories)")
        if args.stage in ("tracker", "all"):
            figures["tracker"] = inside_stage("tracker", args.commands, Path(folder))
            print(f"tracker: {figures['tracker']['instructions_k']:.1f} k instructions per command "
                  f"({figures['tracker']['events']:.0f} events of {figures['tracker']['commands']:.0f} commands)")
        if args.stage in ("chainer", "all"):
            figures["chainer"] = inside_stage("chainer", args.commands, Path(folder))
            print(f"chainer: {figures['chainer']['instructions_k']:.1f} k instructions per command "
                  f"({figures['chainer']['entries']:.0f} entries in {figures['chainer']['intake_records']:.0f} "
                  f"intake records of {figures['chainer']['commands']:.0f} commands)")
        if args.stage in ("gateway", "all"):
            figures["gateway"] = gateway_stage(args.requests, args.connections, Path(folder))
            print(f"gateway: {figures['gateway']['instructions_k']:.1f} k instructions per request "
                  f"({args.requests} requests, {args.connections} connections, one worker)")
    print(json.dumps({"benchmark": "instructions", "load": os.getloadavg(), "figures": figures}))


if __name__ == "__main__":
    main()
