"""Readiness follows the broker and the outbox database: false while either is away, true again after.

A gateway, a relay and a processor worker run as real processes against a private broker
and a private PostgreSQL outbox (never the session's: this test stops both). Their probes:
the gateway's ``/readyz``, the relay's and the processor's ``/readyz`` on their metrics
servers, and the processor's heartbeat through ``keel health processor --ready``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from confluent_kafka.admin import AdminClient

from keel.bootstrap import ensure_local_keys
from keel.config import Settings
from keel.kafka.broker import paths_for, start_broker, stop_broker
from keel.kafka.clients import admin_config
from keel.kafka.topics import apply_topics, declared_topics
from keel.observability.exporter import published
from keel.outbox.local_postgres import UNSAFE_FAST, LocalPostgres, _as_owner, find_binaries, start_postgres
from tests.broker_faults import free_port
from tests.processes import KeelProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

NOT_READY_BOUND_S = 10.0  # checks every second, a TCP connect of at most a second each
READY_AGAIN_BOUND_S = 90.0


def probe(url: str) -> tuple[bool, list[str]]:
    """Whether ``url`` (a ``/readyz``) says ready, and its reasons."""
    try:
        answer = httpx.get(url, timeout=2.0)
    except httpx.HTTPError as exc:
        return False, [f"no answer: {exc}"]
    body = answer.json()
    return answer.status_code == 200 and bool(body["ready"]), list(body.get("reasons", []))


def wait_until(ready: bool, urls: dict[str, str], health: Callable[[], tuple[bool, list[str]]],
               bound_s: float) -> tuple[float, dict[str, list[str]]]:
    """Poll every probe until all say ``ready``; the seconds it took and the last reasons seen."""
    started, seen = time.monotonic(), {}
    while True:
        answers = {name: probe(url) for name, url in urls.items()} | {"processor heartbeat": health()}
        seen = {name: reasons for name, (_ok, reasons) in answers.items()}
        if all(ok is ready for ok, _ in answers.values()):
            return time.monotonic() - started, seen
        assert time.monotonic() - started < bound_s, f"not all {'ready' if ready else 'unready'}: {answers}"
        time.sleep(0.2)


@contextmanager
def private_postgres() -> Iterator[LocalPostgres]:
    server = start_postgres(Path(tempfile.mkdtemp(prefix="keel-ready-pg-")), free_port(),
                            find_binaries(os.environ.get("KEEL_TEST_PG_BIN")), settings=UNSAFE_FAST)
    try:
        yield server
    finally:
        server.stop()


def pg_ctl(server: LocalPostgres, *args: str) -> None:
    subprocess.run(_as_owner([str(server.binaries / "pg_ctl"), "-D", str(server.root / "data"), *args]),
                   capture_output=True, timeout=90, check=True)


def restart_options(server: LocalPostgres) -> str:
    return " ".join((f"-p {server.port} -k {server.root} -c listen_addresses=127.0.0.1 -c max_connections=200",
                     *UNSAFE_FAST))


def test_readiness_follows_the_broker_and_the_outbox(broker_settings: Settings, tmp_path: Path) -> None:
    settings = broker_settings.model_copy(update={
        "data_dir": tmp_path, "kafka_port": free_port(), "kafka_controller_port": free_port(),
        "kafka_bootstrap": None, "topic_partitions": 2, "topic_prefix": f"ready-{uuid.uuid4().hex[:8]}"})
    start_broker(settings)
    with private_postgres() as postgres:
        apply_topics(AdminClient(admin_config(settings)), declared_topics(settings))
        ensure_local_keys(settings)
        port = free_port()
        env = {"KEEL_OUTBOX_DSN": postgres.dsn, "KEEL_KAFKA_PORT": str(settings.kafka_port),
               "KEEL_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port)}
        processes = [KeelProcess(["gateway", "--port", str(port)], settings, tmp_path / "gateway.log", **env),
                     KeelProcess(["relay"], settings, tmp_path / "relay.log", **env),
                     KeelProcess(["process", "--no-supervise", "--instance", "r1"], settings,
                                 tmp_path / "processor.log", **env)]

        def heartbeat() -> tuple[bool, list[str]]:
            done = subprocess.run([sys.executable, "-m", "keel.cli", "health", "processor",
                                   "--instance", "r1", "--ready", "--json"],
                                  env=processes[2].env, capture_output=True, text=True, timeout=30)
            answer = json.loads(done.stdout)
            return done.returncode == 0, [answer["problem"]] if answer["problem"] else []

        try:
            for process in processes:
                process.start()
            deadline = time.monotonic() + 60
            while {t.service for t in published(settings)} < {"relay", "processor"}:
                assert time.monotonic() < deadline, [p.output()[-2000:] for p in processes]
                time.sleep(0.2)
            urls = {"gateway": f"http://127.0.0.1:{port}/readyz"} | {
                t.service: f"http://{t.address}/readyz" for t in published(settings)}
            took, _ = wait_until(True, urls, heartbeat, READY_AGAIN_BOUND_S)
            print(f"\nall ready {took:.1f}s after the probes were found")

            pid = int(paths_for(settings).pid_file.read_text())  # the broker crashes
            os.kill(pid, signal.SIGKILL)
            took, reasons = wait_until(False, urls, heartbeat, NOT_READY_BOUND_S)
            print(f"broker killed: all not ready within {took:.1f}s: {reasons}")
            assert all(any("broker" in reason for reason in why) for why in reasons.values()), reasons

            start_broker(settings)
            took, _ = wait_until(True, urls, heartbeat, READY_AGAIN_BOUND_S)
            print(f"broker back: all ready again within {took:.1f}s of its start")

            outbox_urls = {name: url for name, url in urls.items() if name in ("gateway", "relay")}
            pg_ctl(postgres, "stop", "-m", "fast")
            took, reasons = wait_until(False, outbox_urls, lambda: (False, []), NOT_READY_BOUND_S)
            print(f"outbox stopped: gateway and relay not ready within {took:.1f}s: {reasons}")
            assert all(any(reason.startswith("outbox:") for reason in reasons[name]) for name in outbox_urls), reasons
            assert probe(urls["processor"])[0], "the processor does not need the outbox"

            pg_ctl(postgres, "-o", restart_options(postgres), "-l", str(postgres.root / "log"), "-w", "start")
            took, _ = wait_until(True, outbox_urls, lambda: (True, []), READY_AGAIN_BOUND_S)
            print(f"outbox back: gateway and relay ready again within {took:.1f}s")
            for process in processes:
                process.assert_alive()
                assert "Traceback" not in process.output(), process.output()[-4000:]
        finally:
            for process in processes:
                process.stop(grace_s=30)
            stop_broker(settings)
