"""Broker restarts under load: the processors never stall, never stop, and decide everything once.

The single broker is SIGKILLed and restarted three times while agents keep sending
commands through the gateway; once it stays down longer than the transaction timeout,
which fences the processors' producers. The chainer runs too: its tenant's chain must
verify and hold each event exactly once. The bound on resuming is the watchdog's stall
bound (20 s here) plus a worker's restart and the group's rebalance; the test allows
90 s and prints what it measured. ``benchmarks/broker_restarts.py`` runs longer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from keel.config import Settings
from tests.broker_faults import TRANSACTION_TIMEOUT_MS, running_platform

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
        logs = "\n".join(w.output()[-4000:] for w in platform.workers)
        print(f"resumed after {[round(s, 1) for s in platform.resumes_s]} s; health {health}; "
              f"{len(platform.load.accepted)} commands")

        assert missing == [], f"{len(missing)} acknowledged commands were never decided:\n{logs}"
        events = platform.collector.events
        assert all(len(events[c]) == 1 for c in platform.load.accepted), "a command was decided twice"
        ids = Counter(e.id for decided in events.values() for e in decided)
        assert ids.most_common(1)[0][1] == 1, "an event was written twice"
        for key, in_order in platform.collector.by_key.items():
            versions = [e.version for e in in_order if e.version is not None]
            assert versions == list(range(1, len(versions) + 1)), f"{key} lost its order: {versions}"
        for name, (problem, partitions) in health.items():
            assert problem is None and partitions > 0, f"worker {name} is not deciding ({problem}):\n{logs}"
        for worker in [*platform.workers, platform.chainer]:
            worker.assert_alive()
            assert "Traceback" not in worker.output(), worker.output()[-4000:]
        chain = platform.chained("acme", RESUME_BOUND_S)
        assert chain.ok, chain.summary()
        assert chain.records == sum(len(decided) for decided in events.values()), chain.summary()
