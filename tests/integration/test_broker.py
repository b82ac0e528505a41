"""The local broker's lifecycle: idempotent start, clear failures, never a hang."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.config import Settings
from keel.errors import InfraError
from keel.kafka.broker import broker_status, start_broker, stop_broker

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def isolated(broker_settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """Settings for a second, private broker on free ports with its own data folder."""
    settings = broker_settings.model_copy(update={
        "data_dir": tmp_path, "kafka_port": _free_port(), "kafka_controller_port": _free_port(),
        "kafka_bootstrap": None, "kafka_start_timeout_s": 60.0,
    })
    yield settings
    stop_broker(settings)


def test_a_second_up_while_healthy_is_a_no_op(broker_settings: Settings) -> None:
    from tests.plugins.user_data import USER  # the broker of the session lives in the user's data dir

    before = broker_status(USER)
    after = start_broker(USER)
    assert before.healthy and after.healthy
    assert after.pid == before.pid  # the same process (None only for a broker keel did not start)


def test_a_private_broker_starts_reports_and_stops_by_pid_file(isolated: Settings) -> None:
    started = start_broker(isolated)
    assert started.healthy and started.pid is not None
    assert (isolated.data_dir / "kafka" / "broker.pid").read_text() == str(started.pid)
    stopped = stop_broker(isolated)
    assert not stopped.running and not stopped.healthy
    assert stopped.detail.startswith(f"stopped broker pid {started.pid}; ")
    assert not (isolated.data_dir / "kafka" / "broker.pid").exists()
    assert stop_broker(isolated).detail == "no broker is running"


def test_a_taken_port_is_reported_not_waited_on(isolated: Settings) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", isolated.kafka_controller_port))
        squatter.listen()
        with pytest.raises(InfraError) as caught:
            start_broker(isolated)
    assert caught.value.code == "port_in_use"
    assert str(isolated.kafka_controller_port) in caught.value.message


def test_missing_java_is_reported(isolated: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(InfraError) as caught:
        start_broker(isolated)
    assert caught.value.code == "java_missing"


def test_missing_jars_are_reported_with_the_fetch_command(isolated: Settings, tmp_path: Path) -> None:
    empty_home = tmp_path / "kafka-home"
    empty_home.mkdir()
    with pytest.raises(InfraError) as caught:
        start_broker(isolated.model_copy(update={"kafka_home": empty_home}))
    assert caught.value.code == "broker_missing"
    assert "dependency:copy-dependencies" in caught.value.message


def test_a_broker_that_cannot_start_fails_fast_with_its_log(isolated: Settings, tmp_path: Path) -> None:
    home = tmp_path / "broken-home"
    shutil.copytree(isolated.kafka_home, home, ignore=shutil.ignore_patterns("libs"))
    (home / "libs").symlink_to(isolated.kafka_home / "libs")
    config = home / "server.properties"
    config.write_text(config.read_text().replace("node.id=1", "node.id=not-a-number"))
    with pytest.raises(InfraError) as caught:
        start_broker(isolated.model_copy(update={"kafka_home": home}))
    assert caught.value.code in {"broker_format_failed", "broker_start_failed"}
    assert "Invalid value not-a-number" in caught.value.message
    assert not broker_status(isolated).running
