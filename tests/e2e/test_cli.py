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
from keel.supervision.platform import PlatformState, state_path, stop_platform
from tests.broker_faults import free_port

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


def test_the_demo_runs_the_platform_and_plays_the_story_through_the_gateway_with_api_keys(
        env: dict[str, str], tmp_path: Path) -> None:
    demo_env = {**env, "KEEL_GATEWAY_PORT": str(free_port())}
    settings = Settings(data_dir=Path(env["KEEL_DATA_DIR"]), topic_prefix=env["KEEL_TOPIC_PREFIX"])
    try:
        result = keel("demo", env=demo_env)
        assert result.returncode == 0, result.stderr + result.stdout
        out = result.stdout
        assert "platform: every service healthy" in out
        assert "sent 12 commands through the gateway" in out
        assert out.count("executed") == 8 and out.count("refund_exceeds_paid") >= 4  # GET and ClickHouse rows
        assert out.count("pending_approval") == 2  # the unsure goodwill refunds wait for the customer
        assert "ClickHouse: tenant acme" in out and "ClickHouse: tenant globex" in out
        assert out.count("ApprovalRequested") == 2 and out.count("agent:support-bot") >= 10
        # Each tenant's refund is paid and its e-mail sent by the provider simulator the demo runs.
        assert out.count("payments: succeeded refund_id=act_") == 2 and out.count("email: succeeded email_id=act_") == 2
        assert "events of this run in Kafka: 16" in out  # 12 decisions and 4 EffectSucceeded
        assert "keel-enc:v1:" not in out
        assert keel("tenants", "list", env=demo_env).stdout.split() == ["acme", "globex"]
        status = keel("status", env=demo_env)
        assert status.returncode == 0 and "projector" in status.stdout  # still running in the background
    finally:
        stop_platform(settings)
    assert PlatformState.read(state_path(settings)) is None


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
