"""Broker restarts under load: the processors never stall, never stop, and decide everything once.

The single broker is SIGKILLed and restarted three times while agents keep sending
commands through the gateway; once it stays down longer than the transaction timeout,
which fences the processors' producers. The chainer runs too: its tenant's chain must
verify and hold each event exactly once. The bound on resuming is the watchdog's stall
bound (20 s here) plus a worker's restart and the group's rebalance; the test allows
90 s and prints what it measured. ``benchmarks/broker_restarts.py`` runs longer.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from keel.config import Settings
from keel.kafka.broker import start_broker, stop_broker
from keel.kafka.clients import admin_config
from keel.kafka.topics import apply_topics, declared_topics
from keel.processor.worker import CommandProcessor
from keel.supervision.progress import Progress
from keel.supervision.resilient import run_resilient
from tests.broker_faults import TRANSACTION_TIMEOUT_MS, free_port, running_platform
from tests.helpers import command, events, send, start

pytestmark = pytest.mark.integration

RESUME_BOUND_S = 90.0
OUTAGES_S = (3.0, TRANSACTION_TIMEOUT_MS / 1000 + 8.0, 1.0)


def test_broker_restarts_under_load_leave_every_command_decided_once_and_every_worker_deciding(
        broker_settings: Settings, tmp_path: Path) -> None:
    with running_platform(broker_settings, tmp_path, rate_per_s=40) as platform:
        platform.load.start()
        platform.time_a_decision(RESUME_BOUND_S)  # everything is up and deciding
        for down_s in OUTAGES_S:
            platform.kill_broker()
            platform.restart_broker_after(down_s, RESUME_BOUND_S)
            assert platform.load.refused == [], "the gateway refused commands during the outage"
        platform.load.stop()
        missing = platform.wait_until_decided(RESUME_BOUND_S)
        health = platform.settled_health(RESUME_BOUND_S)
        print(f"resumed after {[round(s, 1) for s in platform.resumes_s]} s; health {health}; "
              f"{len(platform.load.accepted)} commands")

        platform.assert_every_command_decided_once(missing, health, RESUME_BOUND_S)


def test_a_processor_started_before_its_broker_says_so_and_decides_once_the_broker_is_up(
        broker_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = broker_settings.model_copy(update={
        "data_dir": tmp_path, "kafka_port": free_port(), "kafka_controller_port": free_port(),
        "kafka_bootstrap": None, "topic_partitions": 2})
    progress, stop = Progress(), threading.Event()
    worker = threading.Thread(target=run_resilient, kwargs={
        "build": lambda p: CommandProcessor(settings, instance_id="early", progress=p), "stop": stop,
        "role": "processor", "progress": progress, "bootstrap": settings.bootstrap_servers})
    with caplog.at_level(logging.ERROR, logger="keel.supervision.resilient"):
        worker.start()
        try:
            deadline = time.monotonic() + 30
            while "no broker answers" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.1)
            start_broker(settings)
            apply_topics(AdminClient(admin_config(settings)), declared_topics(settings))
            send(settings, command("acme", "sub-1", start()))
            deadline = time.monotonic() + 90
            while progress.last_commit is None:
                assert time.monotonic() < deadline and worker.is_alive(), f"never decided: {progress.step}"
                time.sleep(0.2)
            assert [e.type for e in events(settings)] == ["SubscriptionStarted"]
        finally:
            stop.set()
            worker.join(timeout=60)
            stop_broker(settings)
