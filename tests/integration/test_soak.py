"""The soak (``benchmarks/soak.py``) in its CI form: a short run at a low rate passes and writes its figures.

The whole deployment runs as real ``keel`` processes for a minute and a half of load, on the
session's broker, a throwaway topic prefix and a data dir under ``tmp_path``. A failed
check (an error, a lost command, memory growth) exits 1 and shows the end of its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel.config import Settings

pytestmark = pytest.mark.integration

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def test_a_short_soak_passes_and_writes_its_table_plot_and_figures(broker_settings: Settings,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "KEEL_KAFKA_BOOTSTRAP": broker_settings.bootstrap_servers,
           "KEEL_DATA_DIR": str(tmp_path / "data"), "TMPDIR": str(tmp_path)}  # the run's data dir: under tmp_path
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SOAK), "--minutes", "1.5", "--rate", "20", "--sample-s", "5",
                           "--raw-count", "10000", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=330)
    print(f"soak took {time.monotonic() - started:.0f} s")

    assert done.returncode == 0, done.stderr[-6000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["ok"] and not figures["problems"]
    assert {"gateway", "relay", "processor-1", "chainer", "effects", "projector"} <= figures["memory"].keys()
    assert still_running(f"KEEL_TOPIC_PREFIX={figures['params']['topic_prefix']}") == []
    assert (out / "soak.png").read_bytes().startswith(b"\x89PNG")
    table = (out / "table.txt").read_text()
    assert "steady" in table and "drain" in table
    assert json.loads((out / "soak.json").read_text()) == figures


def still_running(variable: str) -> list[str]:
    """Command lines of the processes whose environment holds ``variable`` (``NAME=value``)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable.encode() in environ.read_bytes().split(b"\0"):
                found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found
