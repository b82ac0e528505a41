"""How long the disk takes to sync a small append, sampled while a benchmark stage runs.

An acknowledgement that waits for a durable write cannot be faster than the disk's sync.
This probe appends 512 bytes to its own file and calls ``fdatasync`` every 10 ms, on the
same disk as the stage's database, and prints one JSON line when it is stopped (SIGTERM)
or its time is up: sample count, p50, p99 and worst sync in milliseconds. A stage whose
latency tail lines up with a slow worst sync waited for the disk, not for Keel.

Run: ``python benchmarks/disk_probe.py FILE SECONDS``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main(path: str, seconds: float) -> None:
    """Sample until SIGTERM or ``seconds``; print the summary."""
    stop = False

    def finish(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, finish)
    samples: list[float] = []
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    deadline = time.monotonic() + seconds
    try:
        while not stop and time.monotonic() < deadline:
            started = time.perf_counter()
            os.write(descriptor, b"x" * 512)
            os.fdatasync(descriptor)
            samples.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)
    finally:
        os.close(descriptor)
        os.unlink(path)
    samples.sort()

    def pick(q: float) -> float:
        return samples[min(int(len(samples) * q), len(samples) - 1)] if samples else 0.0

    print(json.dumps({"samples": len(samples), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
                      "max_ms": samples[-1] if samples else 0.0}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
