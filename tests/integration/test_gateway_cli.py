"""`keel tenants`, `keel keys` and `keel gateway` as a user runs them, against a real server."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from keel.cli.main import app

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_keys_are_created_listed_used_and_revoked_through_the_cli(tmp_path: Path) -> None:
    env = {"KEEL_DATA_DIR": str(tmp_path), "KEEL_OUTBOX_DSN": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
           "KEEL_GATEWAY_KEY_CACHE_S": "0"}
    runner = CliRunner()
    created = runner.invoke(app, ["tenants", "create", "acme", "--no-kafka"], env=env)
    assert created.exit_code == 0 and "created" in created.output
    assert runner.invoke(app, ["tenants", "list"], env=env).output.split() == ["acme"]
    bad = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--actor", "robot"], env=env)
    assert bad.exit_code != 0
    made = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--actor", "agent:support-bot",
                               "--role", "support-agent"], env=env)
    assert made.exit_code == 0, made.output
    token = re.search(r"keel_[0-9a-f]{16}_\S+", made.output).group(0)  # type: ignore[union-attr]
    key_id = token.split("_")[1]
    listed = runner.invoke(app, ["keys", "list", "--tenant", "acme"], env=env).output
    assert key_id in listed and token not in listed

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "keel.cli", "gateway", "--port", str(port)],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "the gateway did not start"
                time.sleep(0.2)
        command = {"id": str(uuid.uuid4()), "type": "CancelSubscription", "aggregate_id": "sub-1",
                   "payload": {"reason": "asked"}}
        headers = {"Authorization": f"Bearer {token}"}
        accepted = httpx.post(f"{base}/v1/commands", json=command, headers=headers)
        assert accepted.status_code == 202, accepted.text
        status = httpx.get(f"{base}/v1/commands/{command['id']}", headers=headers).json()
        assert status["status"] == "accepted" and status["key"] == "acme/sub-1"
        assert status["command_type"] == "CancelSubscription"
        assert "/v1/commands" in httpx.get(f"{base}/openapi.json").json()["paths"]
        wrong = httpx.post(f"{base}/v1/commands", json={**command, "tenant_id": "globex"}, headers=headers)
        assert wrong.status_code == 403
        assert "wrong_tenant" in runner.invoke(app, ["tenants", "rejections", "acme"], env=env).output
        assert runner.invoke(app, ["keys", "revoke", key_id], env=env).exit_code == 0
        refused = httpx.post(f"{base}/v1/commands", json=command, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_key"
    finally:
        server.terminate()
        server.wait(30)
    assert runner.invoke(app, ["keys", "revoke", key_id], env=env).exit_code != 0  # already revoked
