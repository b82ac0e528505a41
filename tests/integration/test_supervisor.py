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

from keel.config import Settings
from keel.supervision.progress import Heartbeat, heartbeat_path
from tests.processes import KeelProcess

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


def test_a_worker_whose_supervisor_was_sigkilled_stops_instead_of_running_on_unseen(
        settings: Settings, tmp_path: Path) -> None:
    worker = KeelProcess(["process", "--instance", "orphan"], settings, tmp_path / "orphan.log",
                         KEEL_DATA_DIR=str(tmp_path))
    worker.start()
    try:
        path, deadline = heartbeat_path(settings.model_copy(update={"data_dir": tmp_path}), "processor", "orphan"), \
            time.monotonic() + 60
        while (beat := Heartbeat.read(path)) is None or beat.partitions == 0:
            worker.assert_alive()
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.2)
        worker.kill()  # the supervisor only: its child is left behind
        deadline = time.monotonic() + 30
        while Path(f"/proc/{beat.pid}").exists() and "Z" not in Path(f"/proc/{beat.pid}/stat").read_text().split()[2]:
            assert time.monotonic() < deadline, f"the orphaned worker {beat.pid} runs on:\n{worker.output()}"
            time.sleep(0.2)
        assert "is gone; stopping" in worker.output()
    finally:
        worker.kill()
