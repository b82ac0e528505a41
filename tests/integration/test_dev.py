"""`keel dev` as a newcomer runs it: every service up, a crash restarted, `keel status` and `keel down`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from keel.config import Settings
from keel.kafka.broker import broker_status
from keel.supervision.platform import SERVICES, PlatformState, alive, health, log_path, state_path
from tests.broker_faults import free_port

pytestmark = pytest.mark.integration

KEEL = [sys.executable, "-m", "keel.cli"]


def test_keel_dev_runs_every_service_restarts_a_killed_one_and_keel_down_stops_them_all(
        broker_settings: Settings, tmp_path: Path) -> None:
    settings = broker_settings.model_copy(update={
        "data_dir": tmp_path, "kafka_port": free_port(), "kafka_controller_port": free_port(),
        "kafka_bootstrap": None, "topic_prefix": f"dev-{uuid.uuid4().hex[:8]}", "topic_partitions": 2})
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update({"KEEL_DATA_DIR": str(tmp_path), "KEEL_KAFKA_PORT": str(settings.kafka_port),
                "KEEL_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
                "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_TOPIC_PARTITIONS": "2",
                "KEEL_GATEWAY_PORT": str(free_port()), "COLUMNS": "200"})
    with (tmp_path / "dev.out").open("ab") as out:
        dev = subprocess.Popen([*KEEL, "dev"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        state = _wait_until_healthy(settings, dev, restarts=0)
        relay = state.services["relay"].pid
        assert relay is not None
        os.kill(relay, signal.SIGKILL)
        state = _wait_until_healthy(settings, dev, restarts=1)
        assert state.services["relay"].pid != relay
        assert "relay ended with exit code -9; starting it again" in log_path(settings, "dev").read_text()
        assert all(log_path(settings, s.name).exists() for s in SERVICES)

        status = subprocess.run([*KEEL, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert all(s.name in status.stdout for s in SERVICES) and "broker" in status.stdout

        down = subprocess.run([*KEEL, "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert dev.wait(timeout=30) == 0, (tmp_path / "dev.out").read_text()[-3000:]
        shown = (tmp_path / "dev.out").read_text()  # off a terminal, the table is drawn once, at the end
        assert all(s.name in shown for s in SERVICES) and "stopped every service" in shown
        assert not any(alive(s.pid) for s in state.services.values())
        assert not broker_status(settings).running
        assert not state_path(settings).exists()
    finally:
        if dev.poll() is None:
            dev.kill()
        subprocess.run([*KEEL, "down"], env=env, capture_output=True, timeout=120)


def _wait_until_healthy(settings: Settings, dev: subprocess.Popen[bytes], *, restarts: int) -> PlatformState:
    """The platform's state once every service is healthy and ``restarts`` restarts happened in all."""
    deadline, problems = time.monotonic() + 180, {}
    while time.monotonic() < deadline:
        assert dev.poll() is None, "keel dev exited"
        state = PlatformState.read(state_path(settings))
        if state is not None and len(state.services) == len(SERVICES):
            problems = {s.name: health(settings, s, state.services[s.name]) for s in SERVICES}
            if not any(problems.values()) and sum(s.restarts for s in state.services.values()) == restarts:
                return state
        time.sleep(0.5)
    raise AssertionError(f"services not healthy in time: {problems}")
