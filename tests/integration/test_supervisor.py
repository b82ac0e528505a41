"""The supervising parent as an operator meets it: a frozen or dead child is replaced, SIGTERM stops both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

# A child that records its start, writes one heartbeat, then freezes (never writes again).
CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from keel.config import Settings
    from keel.supervision.progress import Heartbeat, Progress, heartbeat_path
    with open(sys.argv[1], "a") as starts:
        starts.write(f"{os.getpid()}\\n")
    Heartbeat.of(Progress(), "processor", "t", 60.0).write(heartbeat_path(Settings(), "processor", "t"))
    time.sleep(3600)
""")

PARENT = textwrap.dedent("""
    import sys
    from keel.config import Settings
    from keel.logs import configure_logging
    from keel.supervision.supervisor import supervise
    configure_logging(json_lines=True)
    supervise([sys.executable, "-c", sys.argv[1], sys.argv[2]], Settings(), "processor", "t")
""")


def test_a_frozen_child_is_killed_and_replaced_and_sigterm_stops_parent_and_child(tmp_path: Path) -> None:
    starts, log = tmp_path / "starts", tmp_path / "parent.log"
    env = {**os.environ, "KEEL_DATA_DIR": str(tmp_path), "KEEL_TOPIC_PREFIX": "sup", "KEEL_WATCHDOG_STALL_S": "2"}
    with log.open("ab") as out:
        parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(starts)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(_pids(starts)) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        first, second = _pids(starts)[:2]
        assert not Path(f"/proc/{first}").exists() or "Z" in Path(f"/proc/{first}/stat").read_text().split()[2]
        assert "is frozen: its heartbeat is" in log.read_text()
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=40) == 0, log.read_text()
        latest = _pids(starts)[-1]
        assert not Path(f"/proc/{latest}").exists(), "the child outlived its supervisor"
        assert second != first
    finally:
        if parent.poll() is None:
            parent.kill()


def _pids(starts: Path) -> list[int]:
    return [int(line) for line in starts.read_text().split()] if starts.exists() else []
