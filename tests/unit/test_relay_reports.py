"""The relay reports a failing round when its error changes, not once a second while it lasts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from keel.config import Settings
from keel.gateway.settings import IngressSettings
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.relay.relay import Relay


def test_a_failing_round_is_reported_once_per_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = OutboxStore(open_database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}"))
    store.migrate()
    settings = Settings(data_dir=tmp_path, kafka_bootstrap="127.0.0.1:9")  # never contacted
    relay = Relay(store, settings, IngressSettings())
    try:
        with caplog.at_level(logging.WARNING, logger="keel.relay.relay"):
            for error in ("outbox: connection refused",) * 5 + ("outbox: disk full",) * 3:
                relay._round_failed(RuntimeError(error))
    finally:
        relay.close()
        store.db.close()

    reported = [r.getMessage() for r in caplog.records if r.getMessage().startswith("relay round failed")]
    assert reported == ["relay round failed: outbox: connection refused; retrying every 1 s",
                        "relay round failed: outbox: disk full; retrying every 1 s"]
    assert relay.stats.last_error == "outbox: disk full"
