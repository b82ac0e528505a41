"""SIGTERM under load: a processor worker finishes its transaction, leaves its group and exits in bound.

Two ``keel process --no-supervise`` workers share the command topic while a few thousand
commands stream in; one gets SIGTERM mid-load. It must exit within a bound, every command
must be decided exactly once, and the survivor must hold every partition far sooner than
the session timeout (set long here, 30 s, so a worker that only vanished, without leaving
the group, would be seen).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from keel.config import Settings
from keel.kafka.clients import admin_config
from keel.sdk.producer import CommandProducer
from tests.helpers import command, events, refund, start
from tests.processes import KeelProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

AGGREGATES = 30
COMMANDS_PER_AGGREGATE = 100  # 3,000 commands
SESSION_TIMEOUT_MS = 30_000
EXIT_BOUND_S = 15.0
TAKEOVER_BOUND_S = 10.0  # a third of the session timeout


def assignment(admin: AdminClient, group: str) -> list[int]:
    """How many partitions each member of ``group`` holds now (stable members only)."""
    described = admin.describe_consumer_groups([group], request_timeout=5)[group].result(timeout=10)
    return sorted(len(m.assignment.topic_partitions) for m in described.members)


def wait_for(condition: object, timeout_s: float, what: str) -> float:
    """Poll ``condition`` every 0.1 s; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def test_sigterm_under_load_leaves_the_group_at_once_and_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    env = {"KEEL_PROCESSOR_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS), "KEEL_PROCESSOR_BATCH_SIZE": "200"}
    workers = {name: KeelProcess(["process", "--no-supervise", "--instance", name], settings,
                                 tmp_path / f"{name}.log", **env) for name in ("p1", "p2")}
    admin, group = AdminClient(admin_config(settings)), f"{settings.topic_prefix}.processor"
    plans = [[command("acme", f"sub-{n}", start(10_000_000))] +
             [command("acme", f"sub-{n}", refund(1 + i % 50)) for i in range(1, COMMANDS_PER_AGGREGATE)]
             for n in range(AGGREGATES)]
    sent = [c.id for plan in plans for c in plan]
    try:
        for worker in workers.values():
            worker.start()
        wait_for(lambda: assignment(admin, group) == [1, 2], 90, "both workers to hold partitions")

        def produce() -> None:  # round-robin over the aggregates, so each keeps its order, for ~4 s
            with CommandProducer(settings) as producer:
                for i in range(COMMANDS_PER_AGGREGATE):
                    for plan in plans:
                        producer.send(plan[i])
                    time.sleep(0.04)

        loader = threading.Thread(target=produce, name="load")
        loader.start()
        time.sleep(1.5)  # mid-load
        stopped = workers["p1"]
        assert stopped.process is not None
        stopped.assert_alive()
        process, exited = stopped.process, []
        waiter = threading.Thread(target=lambda: exited.append((process.wait(), time.monotonic())), daemon=True)
        terminated = time.monotonic()
        process.terminate()
        waiter.start()
        takeover_s = wait_for(lambda: assignment(admin, group) == [settings.topic_partitions], 60,
                              "the survivor to hold every partition")
        waiter.join(timeout=60)
        assert exited, "the stopped worker did not exit within 60s"
        exit_s = exited[0][1] - terminated
        loader.join(timeout=120)
        workers["p2"].assert_alive()
        print(f"\nSIGTERM -> exit {exit_s:.2f}s (code {stopped.process.returncode}); "
              f"SIGTERM -> survivor holds all partitions {takeover_s:.2f}s (session timeout "
              f"{SESSION_TIMEOUT_MS / 1000:.0f}s)")
        assert stopped.process.returncode == 0, stopped.output()[-3000:]
        assert exit_s < EXIT_BOUND_S
        assert takeover_s < TAKEOVER_BOUND_S

        decided: Counter[object] = Counter()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            decided = Counter(e.causation_id for e in events(settings))
            if len(decided) >= len(sent):
                break
            time.sleep(1.0)
        assert set(decided) == set(sent), f"{len(set(sent) - set(decided))} commands never decided"
        repeated = {k: n for k, n in decided.items() if n != 1}
        assert not repeated, f"{len(repeated)} commands decided more than once"
        log = stopped.output()
        assert "revoked partitions" in log, log[-3000:]
        for worker in workers.values():
            assert "Traceback" not in worker.output(), worker.output()[-4000:]
    finally:
        for worker in workers.values():
            worker.stop()
