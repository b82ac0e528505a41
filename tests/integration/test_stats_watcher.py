"""The stats watcher against the real broker: counts per tenant, kept across restarts.

The watcher runs as its own process (``keel watch stats``) on this test's topics; counts
are read the way ``keel stats`` reads them, from the table's changelog.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Producer
from typer.testing import CliRunner

from keel.cli.main import app
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, new_command
from support_desk.messages import CancelSubscription, EmailQueued, StartSubscription
from keel.domain.outcomes import to_events
from keel.domain.aggregate import EMPTY as INITIAL
from keel.domain.deciding import decide
from keel.errors import InfraError
from keel.kafka.clients import producer_config
from keel.kafka.topics import Topic, topic_name
from keel.watchers.stats import app_id
from keel.watchers.stats_reader import read_rows
from keel.watchers.stats_tally import UNKNOWN_TENANT, totals_by_tenant
from tests.processes import KeelProcess, remove_app_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RECOVERED = '"event": "stats_table_recovered"'
ACTOR = Actor(kind=ActorKind.AGENT, id="support-bot")
Totals = dict[str, tuple[int, int, int, int]]  # tenant -> commands, accepted, rejected, undecodable
Message = tuple[str, str | None, bytes]


class Watcher(KeelProcess):
    """``keel watch stats`` on this test's topics, its output in a log file."""

    def __init__(self, settings: Settings, log: Path) -> None:
        super().__init__(["watch", "stats"], settings, log)

    def recoveries(self) -> int:
        """How many times the worker said its table is back from the changelog."""
        return self.count(RECOVERED)


@pytest.fixture
def watcher(settings: Settings, tmp_path: Path) -> Iterator[Watcher]:
    """A watcher on this test's topics; killed at the end, its topics and group removed."""
    running = Watcher(settings, tmp_path / "watcher.log")
    try:
        yield running
    finally:
        running.stop(grace_s=5.0)
        remove_app_state(settings, app_id(settings))


def _traffic(tenant: str, *, accepted: int, rejected: int, settings: Settings) -> list[Message]:
    """Commands and the events the processor would write for them."""
    codec, now = EnvelopeCodec(), datetime.now(UTC)
    commands, events = topic_name(settings, Topic.COMMANDS), topic_name(settings, Topic.EVENTS)
    out: list[Message] = []
    for index in range(accepted + rejected):
        payload = (StartSubscription(customer_id=f"c-{index}", plan="pro", monthly_price_cents=900,
                                     currency="EUR")
                   if index < accepted else CancelSubscription(reason="never authorised"))
        command = new_command(payload, tenant_id=tenant, aggregate_id=f"sub-{uuid.uuid4().hex[:8]}",
                              actor=ACTOR)
        outcome = decide(command, INITIAL)
        if index == 0 and accepted:  # a second event of one command: not a second decision
            outcome = [*outcome, EmailQueued(to_address="c@example.com", template="welcome")]
        out.append((commands, command.key, codec.encode(command)))
        out += [(events, event.key, codec.encode(event))
                for event in to_events(command, outcome, version=0, now=now)]
    return out


def _produce(settings: Settings, messages: list[Message]) -> None:
    producer = Producer(producer_config(settings))
    for topic, key, value in messages:
        producer.produce(topic, value, key=key)
    assert producer.flush(15) == 0


def _totals(settings: Settings) -> Totals:
    try:
        rows = read_rows(settings)
    except InfraError as err:
        if err.code == "stats_unavailable":  # the watcher has not created its table yet
            return {}
        raise
    return {tenant: (c.commands, c.accepted, c.rejected, c.undecodable)
            for tenant, c in totals_by_tenant(rows).items()}


def _wait_for(check: Callable[[], bool], what: str, timeout_s: float = 45.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _wait_for_totals(settings: Settings, watcher: Watcher, expected: Totals) -> None:
    def matches() -> bool:
        watcher.assert_alive()
        return _totals(settings) == expected
    try:
        _wait_for(matches, f"counts {expected}")
    except AssertionError as err:
        raise AssertionError(f"{err}; last seen {_totals(settings)}") from None


def _batch_one(settings: Settings) -> tuple[list[Message], Totals]:
    garbage: list[Message] = [(topic_name(settings, Topic.COMMANDS), "x/y", b"not a keel message"),
                              (topic_name(settings, Topic.EVENTS), None, b"\xc3\x01" + bytes(12))]
    messages = (_traffic("acme", accepted=3, rejected=2, settings=settings)
                + _traffic("globex", accepted=2, rejected=1, settings=settings) + garbage)
    return messages, {"acme": (5, 3, 2, 0), "globex": (3, 2, 1, 0), UNKNOWN_TENANT: (0, 0, 0, 2)}


def _batch_two(settings: Settings) -> tuple[list[Message], Totals]:
    messages = (_traffic("acme", accepted=1, rejected=1, settings=settings)
                + _traffic("globex", accepted=2, rejected=0, settings=settings))
    return messages, {"acme": (7, 4, 3, 0), "globex": (5, 4, 1, 0), UNKNOWN_TENANT: (0, 0, 0, 2)}


def test_counts_per_tenant_come_back_after_a_restart_and_keep_growing(
    settings: Settings, watcher: Watcher
) -> None:
    first, after_first = _batch_one(settings)
    second, after_second = _batch_two(settings)
    _produce(settings, first)
    watcher.start()
    _wait_for_totals(settings, watcher, after_first)

    watcher.stop(sig=signal.SIGTERM)  # SIGKILL follows if it does not stop in time
    assert _totals(settings) == after_first
    watcher.start()
    _wait_for(lambda: watcher.recoveries() >= 2, "the restarted watcher to recover its table")
    time.sleep(1.0)  # a restart that re-counted or lost its table would write now
    assert _totals(settings) == after_first, "counts changed before any new message"

    _produce(settings, second)
    _wait_for_totals(settings, watcher, after_second)
    _assert_cli_shows(settings, "acme", after_second["acme"])


def test_kill_9_neither_loses_nor_double_counts(settings: Settings, watcher: Watcher) -> None:
    first, after_first = _batch_one(settings)
    second, after_second = _batch_two(settings)
    watcher.start()
    _produce(settings, first)
    _wait_for_totals(settings, watcher, after_first)

    watcher.stop(sig=signal.SIGKILL)  # most likely before its offsets were committed
    watcher.start()
    _wait_for(lambda: watcher.recoveries() >= 2, "the restarted watcher to recover its table")
    _produce(settings, second)
    _wait_for_totals(settings, watcher, after_second)
    time.sleep(1.0)
    assert _totals(settings) == after_second


def _assert_cli_shows(settings: Settings, tenant: str, expected: tuple[int, int, int, int]) -> None:
    """``keel stats --tenant`` prints rows that add up to ``expected``."""
    result = CliRunner().invoke(app, ["stats", "--tenant", tenant, "--minutes", "10"],
                                env={"KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_DATA_DIR": str(settings.data_dir),
                                     "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers, "COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    cells = [[cell.strip() for cell in line.split("│")[1:-1]]
             for line in result.output.splitlines() if f"│ {tenant} " in line]
    assert cells, result.output
    sums = tuple(sum(int(row[column]) for row in cells) for column in range(2, 6))
    assert sums == expected, result.output
