"""The `keel` command line as a user runs it: the demo, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from keel.config import Settings

KEEL = [sys.executable, "-m", "keel.cli"]


def keel(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KEEL, *args], env={**os.environ, **env}, input=stdin, text=True,
                          capture_output=True, timeout=240, check=False)


@pytest.fixture
def env(broker_settings: Settings, tmp_path: Path) -> dict[str, str]:
    """A private topic prefix, data dir (keys, outbox) and chDB path, on the session's broker."""
    return {"KEEL_TOPIC_PREFIX": f"e2e-{uuid.uuid4().hex[:8]}", "KEEL_DATA_DIR": str(tmp_path / "data"),
            "KEEL_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}",
            "KEEL_KAFKA_BOOTSTRAP": broker_settings.bootstrap_servers,
            "COLUMNS": "200"}


def test_the_demo_shows_both_tenants_events_and_their_clickhouse_rows(env: dict[str, str]) -> None:
    result = keel("demo", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "12 commands → 12 events (2 rejected, 0 dead-lettered)" in out
    assert out.count("ApprovalRequested") >= 4  # parked for the customer: in Kafka and in ClickHouse
    assert out.count("refund_exceeds_paid") >= 4  # two tenants, in Kafka and in ClickHouse
    assert "ClickHouse: tenant acme" in out and "ClickHouse: tenant globex" in out
    assert out.count("6 rows") == 2
    assert "projector: 12 new rows" in out
    assert "keel-enc:v1:" not in out and "⟨sealed⟩" in out  # the customer's address travels sealed
    assert "waits for" in out and '"tenant_id"' not in out  # the parked command summarised, not its JSON
    assert keel("tenants", "list", env=env).stdout.split() == ["acme", "globex"]


def test_a_command_that_breaks_its_schema_is_refused_naming_the_field(env: dict[str, str]) -> None:
    command = {"id": str(uuid.uuid4()), "tenant_id": "acme", "actor": {"kind": "agent", "id": "bot"},
               "type": "IssueRefund", "aggregate_id": "sub-1", "correlation_id": str(uuid.uuid4()),
               "occurred_at": "2026-11-22T12:00:00Z",
               "payload": {"amount_cents": "lots", "currency": "EUR", "reason": "x"}}
    result = keel("submit", "-", env=env, stdin=json.dumps(command))
    assert result.returncode == 1
    assert "[schema_violation] payload.amount_cents" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("body", "code"), [
    ("{not json", "malformed_json"),
    (json.dumps({"type": "LaunchMissiles", "payload": {}}), "unknown_type"),
])
def test_malformed_and_unknown_commands_get_typed_errors(env: dict[str, str], body: str, code: str) -> None:
    result = keel("submit", "-", env=env, stdin=body)
    assert result.returncode == 1
    assert f"[{code}]" in result.stderr


def test_status_reports_the_running_broker(env: dict[str, str]) -> None:
    result = keel("status", env=env)
    assert result.returncode == 0
    assert "healthy" in result.stdout


def test_rotate_master_rewraps_the_keys_of_the_previous_root(tmp_path: Path) -> None:
    from keel.trust.keystore import MasterKey
    from keel.trust.keystore_sqlite import SqliteKeyStore

    old, new = tmp_path / "old.key", tmp_path / "new.key"
    old.write_bytes(os.urandom(32))
    new.write_bytes(os.urandom(32))
    with SqliteKeyStore(tmp_path / "keys.db", MasterKey.from_file(old)) as keys:
        key = keys.key_for("acme", "cust-1")
    env = {"KEEL_DATA_DIR": str(tmp_path), "KEEL_KEYSTORE_DSN": f"sqlite:///{tmp_path / 'keys.db'}",
           "KEEL_MASTER_KEY_FILE": str(new)}

    refused = keel("subjects", "rotate-master", env=env)
    assert refused.returncode == 1 and "[previous_master_key_missing]" in refused.stderr, refused.stderr
    done = keel("subjects", "rotate-master", env={**env, "KEEL_MASTER_KEY_PREVIOUS_FILE": str(old)})
    assert done.returncode == 0, done.stderr
    assert "re-wrapped 1 data key(s)" in done.stdout
    with SqliteKeyStore(tmp_path / "keys.db", MasterKey.from_file(new)) as keys:
        assert keys.lookup("acme", key.key_id) == key
