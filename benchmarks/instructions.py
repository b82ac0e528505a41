"""Instructions per command of the processor's and the gateway's hot paths, counted by callgrind.

Why: on the shared 2-core machines the CPU-time figures of two runs of the same code differ by
up to a third, so a change of a few per cent cannot be told from the drift. Instructions
retired do not drift: two runs of the same code agree within 1 %. They are not time (cache
misses and branch predictions are not counted), so the timed harnesses stay the measure of
the targets; this one says whether a change made the work smaller. Stages:

- ``processor``: the timed part of ``processor_cpu.py --story`` (decode, govern, decide, evolve,
  seal and encode; no Kafka), instrumented around the timed batches only;
- ``gateway``: a one-worker gateway (``keel gateway``, SQLite outbox) under callgrind, answering a
  closed loop of ``POST /v1/commands`` from ``--connections`` keep-alive connections after a
  warm-up; every thread of the process is counted (event loop, outbox writer, key thread).

Needs valgrind (``apt-get install valgrind``); each stage runs about 50 times slower than
natively. Run: ``.venv/bin/python benchmarks/instructions.py [--stage processor|gateway|all]``.
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

import gateway as gateway_bench
from processor_cpu import workload

_COLLECTED = re.compile(r"Collected : (\d+)")


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


def processor_stage(commands: int, folder: Path) -> dict[str, float]:
    """Run this file under callgrind in ``--inside`` mode; instructions per timed command."""
    run = subprocess.run([*_callgrind(folder / "processor.out"), sys.executable, __file__, "--inside",
                          "--commands", str(commands)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    if run.returncode:
        raise SystemExit(f"the processor stage failed:\n{run.stderr[-2000:]}")
    timed = json.loads(run.stdout.strip().splitlines()[-1])["timed"]
    return {"commands": timed, "instructions_k": _collected(run.stderr) / timed / 1e3}


def inside(commands: int) -> None:
    """Under callgrind: build the workload uninstrumented, count only the timed batches."""
    with workload(commands, story=True, batch_size=5000) as (worker, timed):
        _instrument(os.getpid(), True)
        worker.run(timed)
        _instrument(os.getpid(), False)
    print(json.dumps({"timed": len(timed)}))


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
    parser.add_argument("--stage", choices=("processor", "gateway", "all"), default="all")
    parser.add_argument("--commands", type=int, default=3000, help="timed processor commands (about)")
    parser.add_argument("--requests", type=int, default=3000, help="counted gateway requests")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args.commands)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("instructions.py needs valgrind: apt-get install valgrind")
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="keel-instructions-") as folder:
        if args.stage in ("processor", "all"):
            figures["processor"] = processor_stage(args.commands, Path(folder))
            print(f"processor: {figures['processor']['instructions_k']:.1f} k instructions per command "
                  f"({figures['processor']['commands']:.0f} commands, whole stories)")
        if args.stage in ("gateway", "all"):
            figures["gateway"] = gateway_stage(args.requests, args.connections, Path(folder))
            print(f"gateway: {figures['gateway']['instructions_k']:.1f} k instructions per request "
                  f"({args.requests} requests, {args.connections} connections, one worker)")
    print(json.dumps({"benchmark": "instructions", "load": os.getloadavg(), "figures": figures}))


if __name__ == "__main__":
    main()
