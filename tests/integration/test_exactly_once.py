"""The exactly-once oracle: two processor workers under a kill -9 schedule.

Commands of both example domains (support desk subscriptions and deploys services) for
several tenants and many aggregates stream in, interleaved on the same topic, while worker
processes are SIGKILLed and restarted at random 0.1–1 s intervals (and a third worker joins
and leaves, forcing rebalances). Afterwards the events topic, read ``read_committed``, must
equal a reference run of the same pure decision pipeline, aggregate by aggregate: every
command decided exactly once with the same outcome (event type, version, rejection code),
order kept, and the refund and the full rollout parked for approval still pending.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import reduce
from pathlib import Path

import pytest

from keel.config import Settings
from keel.domain.aggregate import EMPTY, evolve_aggregate
from keel.domain.envelope import Envelope, Payload
from keel.domain.events import CommandRejected
from keel.domain.governance.controls import TenantControls
from keel.domain.governance.pipeline import Context, govern
from keel.domain.governance.ratelimit import RateLimiter
from deploys.messages import DeployPreview, PromoteRelease, RollBack
from support_desk.messages import SendEmail
from keel.sdk.producer import CommandProducer
from tests.helpers import command, events, refund, start
from tests.processes import KeelProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

TENANTS = ("acme", "globex", "initech", "umbrella")
SUBSCRIPTIONS_PER_TENANT = 30
SERVICES_PER_TENANT = 10
COMMANDS_PER_AGGREGATE = 125  # 4 x (30 + 10) x 125 = 20,000
MIN_KILLS = 30


def workload() -> dict[str, list[Envelope]]:
    """Each aggregate's commands in order: subscriptions and services of every tenant."""
    rng = random.Random(7)
    plans: dict[str, list[Envelope]] = {}
    for tenant in TENANTS:
        for n in range(SUBSCRIPTIONS_PER_TENANT):
            plans[f"{tenant}/sub-{n}"] = subscription(tenant, f"sub-{n}", rng)
        for n in range(SERVICES_PER_TENANT):
            plans[f"{tenant}/svc-{n}"] = rollouts(tenant, f"svc-{n}", rng)
    return plans


def subscription(tenant: str, aggregate: str, rng: random.Random) -> list[Envelope]:
    """A start, refunds, emails, and one big refund that parks."""
    commands = [command(tenant, aggregate, start(10_000_000))]
    big_at = rng.randrange(10, COMMANDS_PER_AGGREGATE)
    for i in range(1, COMMANDS_PER_AGGREGATE):
        if i == big_at:
            commands.append(command(tenant, aggregate, refund(500_000)))  # needs an admin: parks
        elif i % 10 == 0:
            commands.append(command(tenant, aggregate, SendEmail(to_address="c@example.com", template="t")))
        else:
            commands.append(command(tenant, aggregate, refund(rng.randrange(1, 100))))
    return commands


def rollouts(tenant: str, service: str, rng: random.Random) -> list[Envelope]:
    """Release after release previewed, promoted twice and rolled back step by step, with the
    refusals of every business rule in between, and one promotion to 100 % that parks."""
    commands: list[Envelope] = []

    def add(payload: Payload) -> Envelope:
        commands.append(command(tenant, service, payload))
        return commands[-1]

    full_at, release = rng.randrange(1, 10), 0
    while len(commands) < COMMANDS_PER_AGGREGATE:
        name, low = f"v{release}", rng.randrange(1, 50)
        add(DeployPreview(release=name, commit_sha=f"{rng.getrandbits(28):07x}"))
        first = add(PromoteRelease(release=name, percent=low))
        add(PromoteRelease(release=name, percent=low))  # percent_must_grow
        add(PromoteRelease(release=f"v{release + 1}", percent=low))  # no_preview
        second = add(PromoteRelease(release=name, percent=rng.randrange(low + 1, 100)))
        if release:
            add(PromoteRelease(release=f"v{release - 1}", percent=low))  # rollout_in_progress
        if release == full_at:
            add(PromoteRelease(release=name, percent=100))  # needs an admin: parks
        add(RollBack(promotion_id=first.id, reason="t"))  # later_promotion_stands
        add(RollBack(promotion_id=second.id, reason="t"))
        add(RollBack(promotion_id=second.id, reason="t"))  # nothing_to_roll_back
        add(RollBack(promotion_id=first.id, reason="t"))
        add(DeployPreview(release=name, commit_sha="0000000"))  # preview_exists
        release += 1
    return commands[:COMMANDS_PER_AGGREGATE]


Outcome = tuple[str, int | None, str | None]


def outcome(event: Envelope) -> Outcome:
    """An event as the oracle compares it: its type, its version and, for a rejection, the code."""
    return event.type, event.version, event.payload.code if isinstance(event.payload, CommandRejected) else None


def expected_outcomes(commands: list[Envelope]) -> list[Outcome]:
    """What the pure pipeline decides for one aggregate's commands, in order."""
    state, decided = EMPTY, []
    for cmd in commands:
        decision = govern(cmd, state, Context(TenantControls(), RateLimiter(), datetime.now(UTC)))
        state = reduce(evolve_aggregate, decision.events, state)
        decided += [outcome(e) for e in decision.events]
    return decided


class Worker(KeelProcess):
    """A `keel process` worker with a fixed instance id (a static group member)."""

    def __init__(self, settings: Settings, instance: str, logs: Path) -> None:
        super().__init__(["process", "--no-supervise", "--instance", instance], settings, logs / f"{instance}.log",
                         KEEL_PROCESSOR_STATIC_MEMBERSHIP="true", KEEL_PROCESSOR_BATCH_SIZE="500")

    def assignments(self) -> int:
        """How many partition assignments this worker has logged so far (over all its lives)."""
        return self.count("assigned partitions")

    def working(self, since: int) -> bool:
        """Alive and assigned partitions since the count was ``since``: mid-stream, not booting."""
        return self.alive() and self.assignments() > since


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[dict[str, Worker]]:
    pool = {name: Worker(settings, name, tmp_path) for name in ("w1", "w2", "w3")}
    yield pool
    for worker in pool.values():
        worker.kill()


def test_kill_9_schedule_yields_every_decision_exactly_once(settings: Settings, workers: dict[str, Worker]) -> None:
    plans = workload()
    total = sum(len(c) for c in plans.values())
    assert total >= 20_000
    expected = {key: expected_outcomes(commands) for key, commands in plans.items()}
    covered = {(kind, code) for decided in expected.values() for kind, _, code in decided}
    assert covered >= {("RefundIssued", None), ("EmailQueued", None), ("SubscriptionStarted", None),
                       ("PreviewDeployed", None), ("ReleasePromoted", None), ("ReleaseRolledBack", None),
                       ("ApprovalRequested", None)} | {("CommandRejected", code) for code in (
                           "percent_must_grow", "no_preview", "rollout_in_progress", "later_promotion_stands",
                           "nothing_to_roll_back", "preview_exists")}, "the workload must exercise both domains"

    def produce() -> None:
        queues = [list(c) for c in plans.values()]
        with CommandProducer(settings) as producer:
            for round_ in range(COMMANDS_PER_AGGREGATE):
                for queue in queues:
                    producer.send(queue[round_])
                if round_ % 5 == 4:
                    producer.flush()
                    time.sleep(0.1)  # spread the load over the kill schedule

    feeder = threading.Thread(target=produce)
    workers["w1"].start()
    time.sleep(3)
    workers["w2"].start()  # a rebalance: w2 joins
    feeder.start()
    rng, kills, started = random.Random(11), 0, time.monotonic()
    booted = {name: 0 for name in ("w1", "w2")}  # assignments logged before the current life
    while feeder.is_alive() or kills < MIN_KILLS:
        time.sleep(rng.uniform(0.1, 1.0))
        ready = [name for name in booted if workers[name].working(booted[name])]
        if not ready:
            continue  # only kill a worker that is processing, never one still booting
        name = rng.choice(ready)
        booted[name] = workers[name].assignments()
        workers[name].kill()
        workers[name].start()
        kills += 1
        if kills == 10:
            workers["w3"].start()  # another rebalance: a third worker joins ...
        if kills == 20:
            workers["w3"].stop()  # ... and leaves
    feeder.join()
    assert kills >= MIN_KILLS
    assert sum(workers[n].assignments() for n in booted) >= MIN_KILLS, "kills must land on working workers"

    deadline = time.monotonic() + 180
    while True:
        decided = Counter(e.causation_id for e in events(settings) if e.type != "ApprovalGranted")
        if len(decided) >= total or time.monotonic() > deadline:
            break
        time.sleep(2)
    elapsed = time.monotonic() - started

    actual = events(settings)
    ids = Counter(e.id for e in actual)
    assert [i for i, n in ids.items() if n > 1] == [], "an event was published twice"
    by_aggregate: dict[str, list[Envelope]] = defaultdict(list)
    for event in actual:
        by_aggregate[event.key].append(event)
    mismatched = [key for key in plans if [outcome(e) for e in by_aggregate[key]] != expected[key]]
    assert mismatched == [], f"{len(mismatched)} aggregates differ from the reference, e.g. {mismatched[:3]}"
    for key, commands in plans.items():
        assert [e.causation_id for e in by_aggregate[key]] == [c.id for c in commands], key
        state = reduce(evolve_aggregate, by_aggregate[key], EMPTY)
        assert state.aggregate == ("service" if "/svc-" in key else "subscription"), key
        assert len(state.pending) == 1, f"{key}: the parked refund or full rollout must still wait"
    print(f"\n{total} commands, {len(actual)} events, {kills} SIGKILLs in {elapsed:.0f}s")
