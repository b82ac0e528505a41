"""Readiness: verdicts, stale verdicts, the checks, the probes beside /metrics, and ``keel health --ready``."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from keel.cli.main import app
from keel.config import Settings
from keel.outbox.db import SQLiteDatabase
from keel.supervision import probes, readiness
from keel.supervision.platform import INSTANCE, SERVICES, ServiceState, health
from keel.supervision.progress import Heartbeat, Progress, heartbeat_path
from keel.supervision.readiness import Readiness
from keel.supervision.watchdog import Watchdog


def test_a_verdict_names_every_failing_check_and_a_raising_check_is_a_reason() -> None:
    def boom() -> str | None:
        raise RuntimeError("driver exploded")

    verdict = Readiness({"ok": lambda: None, "broker": lambda: "away", "db": boom}).refresh()
    assert not verdict.ready
    assert verdict.reasons == ("broker: away", "db: check failed: driver exploded")
    assert Readiness({"ok": lambda: None}).refresh().ready


def test_before_the_first_round_and_after_the_checks_stop_it_is_not_ready() -> None:
    ready = Readiness({"ok": lambda: None}, stale_after_s=0.05)
    assert ready.verdict() is readiness.NOT_CHECKED and not ready.verdict().ready
    ready.refresh()
    assert ready.verdict().ready
    time.sleep(0.1)  # nobody refreshed since: a hung check must not leave "ready" standing
    assert "have not finished" in ready.verdict().reasons[0]


def test_the_thread_refreshes_without_the_caller_waiting() -> None:
    answers: list[str | None] = ["away"]
    slow = threading.Event()

    def check() -> str | None:
        slow.wait(0.05)
        return answers[0]

    ready = Readiness({"broker": check}, interval_s=0.02).start()
    try:
        started = time.monotonic()
        ready.verdict()
        assert time.monotonic() - started < 0.01  # a probe never runs a check itself
        deadline = time.monotonic() + 2
        while ready.verdict().ready is not False and time.monotonic() < deadline:
            time.sleep(0.01)
        answers[0] = None
        while not ready.verdict().ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.verdict().ready
    finally:
        ready.stop()


def test_the_broker_check_is_a_tcp_connect() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert readiness.broker(f"127.0.0.1:{port}")() is None
    assert "no broker answers" in (readiness.broker(f"127.0.0.1:{port}")() or "")


def test_the_sqlite_outbox_check_reads_without_creating(tmp_path: Path) -> None:
    db = SQLiteDatabase(tmp_path / "outbox.sqlite3")
    assert "cannot be read" in (readiness.outbox(db)() or "")
    assert not (tmp_path / "outbox.sqlite3").exists()  # a check never creates the database
    sqlite3.connect(tmp_path / "outbox.sqlite3").close()
    assert readiness.outbox(db)() is None
    odd = tmp_path / "a dir#1" / "outbox?.sqlite3"  # as a DSN may name it: quoted in the URI
    odd.parent.mkdir()
    sqlite3.connect(odd).close()
    assert readiness.outbox(SQLiteDatabase(Path("/" + str(odd))))() is None  # sqlite:////abs/path: a leading //


def test_the_worker_check_follows_progress() -> None:
    progress = Progress()
    assert readiness.worker(progress)() == "the worker is not running (starting)"
    progress.running = True
    assert readiness.worker(progress)() is None


def _get(application: probes.WsgiApp, path: str) -> tuple[str, dict[str, Any] | bytes]:
    answered: list[str] = []
    body = b"".join(application({"PATH_INFO": path}, lambda status, _headers: answered.append(status)))
    return answered[0], (json.loads(body) if answered[0][:3] in ("200", "503") and body.startswith(b"{") else body)


def test_the_probes_answer_beside_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    def metrics(_environ: dict[str, Any], start_response: probes.StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        return [b"keel_up 1\n"]

    application = probes.with_probes(metrics)
    assert _get(application, "/metrics") == ("200 OK", b"keel_up 1\n")
    assert _get(application, "/healthz") == ("200 OK", {"live": True})
    answers: list[str | None] = ["broker: away"]
    monkeypatch.setattr(readiness, "_current", None)
    ready = readiness.install(Readiness({"x": lambda: answers[0]}, interval_s=60))
    try:
        ready.refresh()
        status, body = _get(application, "/readyz")
        assert status.startswith("503") and isinstance(body, dict)
        assert body["ready"] is False and body["reasons"] == ["x: broker: away"]
        answers[0] = None
        ready.refresh()
        assert _get(application, "/readyz")[0] == "200 OK"
    finally:
        ready.stop()


def test_install_replaces_and_stops_the_previous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness, "_current", None)
    first = readiness.install(Readiness({}, interval_s=60))
    second = readiness.install(Readiness({}, interval_s=60))
    assert readiness.current() is second and first._stop.is_set()
    second.stop()


def test_the_heartbeat_carries_readiness_and_keel_health_ready_reads_it(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, topic_prefix="t")
    path = heartbeat_path(settings, "processor", "r1")
    ready = Readiness({"broker": lambda: "no broker answers at x:1"})
    ready.refresh()
    Watchdog(Progress(), path, role="processor", instance="r1", bound_s=60, readiness=ready).check()
    beat = Heartbeat.read(path)
    assert beat is not None and not beat.ready and beat.not_ready == "broker: no broker answers at x:1"
    env = {"KEEL_DATA_DIR": str(tmp_path), "KEEL_TOPIC_PREFIX": "t"}
    runner = CliRunner()
    live = runner.invoke(app, ["health", "processor", "--instance", "r1"], env=env)
    assert live.exit_code == 0 and "not ready" in live.output
    unready = runner.invoke(app, ["health", "processor", "--instance", "r1", "--ready", "--json"], env=env)
    answer = json.loads(unready.output)
    assert unready.exit_code == 1 and answer["live"] and not answer["ready"]
    assert answer["problem"] == "not ready: broker: no broker answers at x:1"


def test_a_heartbeat_written_before_readiness_existed_reads_as_ready(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"role": "processor", "instance": "0", "pid": 1, "step": "idle", "step_age_s": 0.1,
                                "last_commit_age_s": None, "partitions": 2, "stalled": None, "written_at": 0.0}))
    beat = Heartbeat.read(path)
    assert beat is not None and beat.ready and beat.not_ready is None


def test_keel_status_shows_a_live_worker_that_is_not_ready(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, topic_prefix="t")
    processor = next(s for s in SERVICES if s.heartbeat_role == "processor")
    ready = Readiness({"broker": lambda: "no broker answers at x:1"})
    ready.refresh()
    Watchdog(Progress(), heartbeat_path(settings, "processor", INSTANCE), role="processor", instance=INSTANCE,
             bound_s=60, readiness=ready).check()
    state = ServiceState("processor", pid=os.getpid(), state="running")
    assert health(settings, processor, state) == "not ready: broker: no broker answers at x:1"
    relay = next(s for s in SERVICES if s.name == "relay")  # no metrics server published: nothing to ask
    assert health(settings, relay, ServiceState("relay", pid=os.getpid(), state="running")) is None


def test_each_change_of_verdict_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    answers: list[str | None] = ["away"]
    ready = Readiness({"broker": lambda: answers[0]})
    with caplog.at_level("INFO", logger="keel.supervision.readiness"):
        ready.refresh()
        ready.refresh()
        answers[0] = None
        ready.refresh()
    assert [r.getMessage() for r in caplog.records] == ["not ready: broker: away", "ready"]


def test_a_probe_before_the_first_checks_is_valid_json() -> None:
    body = readiness.NOT_CHECKED.as_dict()

    assert json.loads(json.dumps(body, allow_nan=False)) == {
        "ready": False, "reasons": ["starting: not checked yet"], "checked_s_ago": None}


def test_the_default_check_is_installed_by_the_first_probe_not_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness, "_current", None)
    built: list[Readiness] = []

    def default() -> Readiness:
        built.append(Readiness({"broker": lambda: "no broker answers at x:1"}, interval_s=60))
        return built[-1]

    application = probes.with_probes(lambda _environ, _start: [], default)
    assert readiness.current() is None and not built  # a service may still install the checks it means
    try:
        status, body = _get(application, "/readyz")
        assert status.startswith("503") and isinstance(body, dict) and body["ready"] is False
        assert readiness.current() is built[0]
        _get(application, "/readyz")
        assert len(built) == 1
    finally:
        built[0].stop()
