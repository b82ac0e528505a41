"""The pure parts of keeping workers deciding: steps and stalls, heartbeats, liveness, rebuilds."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException
from typer.testing import CliRunner

from keel.cli.main import app
from keel.errors import InfraError
from keel.kafka.idle import left_out
from keel.supervision import resilient
from keel.supervision.progress import BACKOFF, IDLE, Heartbeat, Progress, liveness
from keel.supervision.resilient import run_resilient
from keel.supervision.watchdog import Watchdog


def aged(name: str, age_s: float) -> Progress:
    progress = Progress()
    progress.enter(name)
    progress.step = type(progress.step)(name, time.monotonic() - age_s)
    return progress


@pytest.mark.parametrize(("step", "age_s", "stalled"), [
    ("send_offsets_to_transaction", 61.0, True),
    ("send_offsets_to_transaction", 59.0, False),
    ("commit_transaction", 3600.0, True),
    (IDLE, 3600.0, False),
    (BACKOFF, 3600.0, False),
])
def test_only_a_watched_step_that_outlasts_its_bound_is_a_stall(step: str, age_s: float, stalled: bool) -> None:
    reason = aged(step, age_s).stalled(60.0, time.monotonic())
    assert (reason is not None) == stalled
    if reason is not None:
        assert step in reason and "bound 60s" in reason


def test_staying_in_a_step_keeps_its_clock_and_entering_restarts_it() -> None:
    progress = aged("records waiting, none consumed", 30.0)
    progress.stay("records waiting, none consumed")
    assert time.monotonic() - progress.step.since >= 30.0
    progress.enter("records waiting, none consumed")
    assert time.monotonic() - progress.step.since < 1.0


def test_a_commit_returns_the_worker_to_idle_and_dates_its_progress() -> None:
    progress = aged("commit_transaction", 100.0)
    progress.committed()
    assert progress.step.name == IDLE and progress.last_commit == progress.step.since
    assert progress.stalled(1.0, time.monotonic() + 3600) is None


def test_the_watchdog_writes_the_heartbeat_and_ends_a_stalled_worker(tmp_path: Path) -> None:
    stalls: list[str] = []
    path = tmp_path / "run" / "p.json"
    progress = aged("send_offsets_to_transaction", 5.0)
    dog = Watchdog(progress, path, role="processor", instance="a", bound_s=10.0, on_stall=lambda: stalls.append("x"))

    assert dog.check().stalled is None and stalls == []
    assert Heartbeat.read(path) is not None and json.loads(path.read_text())["step"] == "send_offsets_to_transaction"
    progress.step = type(progress.step)(progress.step.name, time.monotonic() - 11.0)
    beat = dog.check()
    assert stalls == ["x"] and beat.stalled is not None
    assert "stalled: stuck in send_offsets_to_transaction" in (liveness(Heartbeat.read(path), time.time(), 10) or "")
    dog.stop()
    assert not path.exists()


def test_liveness_needs_a_fresh_heartbeat_without_a_stall() -> None:
    beat = Heartbeat.of(Progress(), "chainer", "0", 60.0)
    assert liveness(beat, beat.written_at + 1, 10.0) is None
    assert "old" in (liveness(beat, beat.written_at + 11, 10.0) or "")
    assert "no heartbeat" in (liveness(None, time.time(), 10.0) or "")


def test_keel_health_exits_1_for_a_missing_or_stalled_worker_and_0_for_a_live_one(tmp_path: Path) -> None:
    env = {"KEEL_DATA_DIR": str(tmp_path), "KEEL_TOPIC_PREFIX": "unit"}
    runner = CliRunner()
    missing = runner.invoke(app, ["health", "processor", "--instance", "a"], env=env)
    assert missing.exit_code == 1 and "no heartbeat" in missing.output
    path = tmp_path / "run" / "unit.processor.a.json"
    Heartbeat.of(Progress(), "processor", "a", 60.0).write(path)
    live = runner.invoke(app, ["health", "processor", "--instance", "a", "--json"], env=env)
    assert live.exit_code == 0 and json.loads(live.output)["live"] is True
    Heartbeat.of(aged("commit_transaction", 99.0), "processor", "a", 60.0).write(path)
    stalled = runner.invoke(app, ["health", "processor", "--instance", "a"], env=env)
    assert stalled.exit_code == 1 and "stuck in commit_transaction" in stalled.output


class FakeWorker:
    """Runs until stopped, or raises what it was given."""

    def __init__(self, failure: Exception | None, stop: threading.Event) -> None:
        self.failure, self.stop, self.closed = failure, stop, False

    def run(self, stop: threading.Event) -> None:
        if self.failure is not None:
            raise self.failure
        self.stop.set()

    def close(self) -> None:
        self.closed = True


def test_a_failing_start_or_a_fenced_worker_is_rebuilt_until_one_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resilient, "FIRST_WAIT_S", 0.0)
    answers = iter([False] + [True] * 10)  # away at first: no worker is built until it answers
    monkeypatch.setattr(resilient, "broker_answers", lambda _bootstrap: next(answers))
    stop = threading.Event()
    fenced = InfraError("fenced", code="processor_transaction_failed")
    plan: list[Exception | FakeWorker] = [
        KafkaException(KafkaError(KafkaError._TRANSPORT, "broker away")),
        FakeWorker(fenced, stop),
        FakeWorker(None, stop),
    ]
    built: list[FakeWorker] = []

    def build(_progress: Progress) -> FakeWorker:
        step = plan.pop(0)
        if isinstance(step, Exception):
            raise step
        built.append(step)
        return step

    run_resilient(build, stop, role="processor", progress=Progress(), bootstrap="127.0.0.1:1")
    assert plan == [] and [w.closed for w in built] == [True, True]


def test_an_unexpected_error_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resilient, "broker_answers", lambda _bootstrap: True)
    stop = threading.Event()

    def build(_progress: Progress) -> FakeWorker:
        return FakeWorker(ValueError("a bug"), stop)

    with pytest.raises(ValueError, match="a bug"):
        run_resilient(build, stop, role="processor", progress=Progress(), bootstrap="127.0.0.1:1")


def test_a_wait_begun_while_the_broker_was_away_ends_when_it_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([False, False, True])
    monkeypatch.setattr(resilient, "broker_answers", lambda _bootstrap: next(answers))
    started = time.monotonic()
    resilient.wait_to_retry(threading.Event(), 30.0, "b:1")
    assert 1.5 < time.monotonic() - started < 5.0


def test_a_wait_begun_while_the_broker_answered_lasts_its_whole_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resilient, "broker_answers", lambda _bootstrap: True)
    started = time.monotonic()
    resilient.wait_to_retry(threading.Event(), 2.0, "b:1")
    assert time.monotonic() - started >= 2.0


def test_a_group_the_broker_cannot_describe_in_time_is_not_taken_for_a_left_out_worker() -> None:
    class Unanswered(Future[object]):
        """A description that does not arrive: the broker is restarting."""

        def result(self, timeout: float | None = None) -> object:
            raise TimeoutError()

    class RestartingBroker:
        def describe_consumer_groups(self, groups: list[str], request_timeout: float) -> dict[str, Future[object]]:
            return {group: Unanswered() for group in groups}

    assert left_out(Consumer({"group.id": "g"}), RestartingBroker(), "g") is False  # type: ignore[arg-type]
