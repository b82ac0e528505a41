"""`keel tenants`, `keel keys` and `keel gateway` as a user runs them, against a real server."""

from __future__ import annotations

import json
import os
import re
import signal
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
        assert "server" not in accepted.headers and "date" in accepted.headers  # no software named; a clock
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


def _workers(parent: int) -> set[int]:
    """The gateway's worker processes: children of ``parent`` started by multiprocessing's spawn."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent \
                    and b"spawn_main" in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def _serving_pids(port: int) -> set[int]:
    """Processes holding established connections on ``port`` (from /proc/net/tcp and fd links)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # local port, ESTABLISHED
            inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def test_workers_share_connections_and_a_dead_worker_is_replaced(tmp_path: Path) -> None:
    env = {**os.environ, "KEEL_DATA_DIR": str(tmp_path), "KEEL_OUTBOX_DSN": f"sqlite:///{tmp_path / 'o.sqlite3'}"}
    runner = CliRunner()
    assert runner.invoke(app, ["tenants", "create", "acme", "--no-kafka"], env=env).exit_code == 0
    made = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--actor", "agent:support-bot"], env=env)
    token = re.search(r"keel_[0-9a-f]{16}_\S+", made.output).group(0)  # type: ignore[union-attr]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "keel.cli", "gateway", "--port", str(port), "--workers", "2"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    headers = {"Authorization": f"Bearer {token}"}

    def post_from(clients: list[httpx.Client]) -> None:
        for client in clients:
            command = {"id": str(uuid.uuid4()), "type": "CancelSubscription", "aggregate_id": "sub-1",
                       "payload": {"reason": "asked"}}
            answer = client.post(f"http://127.0.0.1:{port}/v1/commands", json=command, headers=headers)
            assert answer.status_code == 202, answer.text

    try:
        deadline = time.monotonic() + 60
        while len(_workers(server.pid)) < 2 or not _listening(port):
            assert time.monotonic() < deadline and server.poll() is None, "the gateway did not start"
            time.sleep(0.2)
        clients = [httpx.Client() for _ in range(24)]  # keep-alive connections, as a load balancer holds
        post_from(clients)
        workers = _workers(server.pid)
        assert _serving_pids(port) & workers == workers, "one worker took every connection"
        for client in clients:
            client.close()

        victim = next(iter(workers))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(_workers(server.pid) - {victim}) < 2:
            assert time.monotonic() < deadline and server.poll() is None, "the dead worker was not replaced"
            time.sleep(0.2)
        fresh = [httpx.Client() for _ in range(8)]
        deadline = time.monotonic() + 60
        while True:  # the replacement needs a moment to bind; the survivor answers meanwhile
            try:
                post_from(fresh)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        for client in fresh:
            client.close()
    finally:
        server.terminate()
        assert server.wait(30) == 0
    assert not _workers(server.pid)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_taken_port_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "keel.cli", "gateway", "--port", str(port), "--workers", "2"],
                              env={**os.environ, "KEEL_DATA_DIR": str(tmp_path),
                                   "KEEL_OUTBOX_DSN": f"sqlite:///{tmp_path / 'o.sqlite3'}"},
                              capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "port_unavailable" in done.stderr + done.stdout and str(port) in done.stderr + done.stdout


@pytest.mark.parametrize("trusted, client", [("", "127.0.0.1"), ("127.0.0.1", "203.0.113.9")])
def test_forwarded_headers_name_the_client_only_from_a_trusted_proxy(tmp_path: Path, trusted: str, client: str) -> None:
    """Any local process can send ``X-Forwarded-For``: it is believed only from the proxies configured."""
    log = tmp_path / "gateway.log"
    env = {**os.environ, "KEEL_DATA_DIR": str(tmp_path), "KEEL_OUTBOX_DSN": f"sqlite:///{tmp_path / 'o.sqlite3'}",
           "KEEL_GATEWAY_TRUSTED_PROXIES": trusted}
    port = _free_port()
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "keel.cli", "gateway", "--port", str(port)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert time.monotonic() < deadline and server.poll() is None, "the gateway did not start"
            time.sleep(0.2)
        refused = httpx.post(f"http://127.0.0.1:{port}/v1/commands", json={}, headers={
            "Authorization": "Bearer keel_0000000000000000_nope", "X-Forwarded-For": "203.0.113.9"})
        assert refused.status_code == 401
    finally:
        server.terminate()
        server.wait(30)
    [line] = [json.loads(line) for line in log.read_text().splitlines() if '"request refused"' in line]
    assert (line["code"], line["client"]) == ("invalid_key", client)
