"""Lifecycle of the local single-node KRaft broker: ``keel up``, ``keel down``, ``keel status``.

The broker is Apache Kafka's own jars (fetched by Maven into ``infra/kafka/libs``) run
with ``java -cp libs/* kafka.Kafka``. Storage is formatted once with
``kafka.tools.StorageTool``. Start-up waits until the broker answers a metadata request
and fails with the log tail if it does not within the configured bound. Stop uses the
PID file, never a process-name match.

``secure=True`` (``keel up --secure``) renders ``server-secure.properties`` instead: SASL/SCRAM
and the StandardAuthorizer. The platform principal's random password is written, 0600, to
``credentials.json`` next to the data; a data folder formatted secure always starts secure.

``keel.kafka.cluster`` (``keel up --brokers N``) runs N such brokers as one KRaft cluster with
the helpers below (JVM command, launch, storage format, PID files, port and Java checks).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from keel.config import Settings
from keel.errors import InfraError

_STOP_TIMEOUT_S = 30.0
PLATFORM_USER = "keel-platform"

# The collector settings of Kafka's own start script (kafka-run-class.sh), which this module
# replaces: G1 aiming at 20 ms pauses, not its 200 ms default, since every transaction commit
# waits on the broker. The heap is the caller's (1 GiB for the single broker, as the script's).
_JVM_PERFORMANCE = ["-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                    "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
                    "-Djava.awt.headless=true"]


@dataclass(frozen=True)
class BrokerPaths:
    """Files of one local broker under the data folder."""

    root: Path

    @property
    def log_dirs(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def config(self) -> Path:
        return self.root / "server.properties"

    @property
    def pid_file(self) -> Path:
        return self.root / "broker.pid"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def server_log(self) -> Path:
        return self.logs / "server.log"

    @property
    def console_log(self) -> Path:
        return self.logs / "console.log"


@dataclass(frozen=True)
class BrokerStatus:
    """What ``keel status`` reports."""

    running: bool
    healthy: bool
    pid: int | None
    bootstrap: str
    detail: str


def paths_for(settings: Settings) -> BrokerPaths:
    """The broker's files for these settings."""
    return BrokerPaths(settings.data_dir / "kafka")


def platform_auth(settings: Settings) -> dict[str, Any]:
    """librdkafka settings of the platform principal of a secure local broker ({} if not secure)."""
    path = paths_for(settings).credentials
    if not path.exists():
        return {}
    secret = json.loads(path.read_text())
    return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": secret["admin_user"], "sasl.password": secret["admin_password"]}


def broker_status(settings: Settings) -> BrokerStatus:
    """Report whether the PID file's process lives and the broker answers metadata."""
    paths = paths_for(settings)
    pid = read_pid(paths.pid_file)
    running = pid is not None and pid_alive(pid)
    healthy = answers_metadata(settings.bootstrap_servers, timeout_s=3.0, auth=platform_auth(settings))
    if healthy and running:
        detail = f"broker pid {pid} is serving {settings.bootstrap_servers}"
    elif healthy:
        detail = f"a broker not started by keel is serving {settings.bootstrap_servers}"
    elif running:
        detail = f"broker pid {pid} is running but does not answer on {settings.bootstrap_servers}"
    else:
        detail = "no broker is running"
    return BrokerStatus(running, healthy, pid if running else None, settings.bootstrap_servers, detail)


def start_broker(settings: Settings, *, secure: bool = False) -> BrokerStatus:
    """Start the local broker unless one already serves; a second call is a no-op."""
    paths = paths_for(settings)
    formatted = (paths.log_dirs / "meta.properties").exists()
    if secure and formatted and not paths.credentials.exists():
        raise InfraError(f"{paths.root} was formatted without --secure; run `keel down --wipe` first",
                         code="broker_not_secure")
    status = broker_status(settings)
    if status.healthy:
        return status
    if status.running and status.pid is not None:
        raise InfraError(
            f"broker pid {status.pid} is running but not answering; run `keel down` first",
            code="broker_unhealthy",
        )
    java = require_java()
    classpath = require_jars(settings.kafka_home)
    for port in (settings.kafka_port, settings.kafka_controller_port):
        require_free_port(settings.kafka_host, port)

    paths.logs.mkdir(parents=True, exist_ok=True)
    if secure and not formatted:
        _write_credentials(paths)
    _render_config(settings, paths)
    jvm = jvm_command(settings, paths, java, classpath, heap="1g")
    if not formatted:
        format_storage(jvm, paths, new_cluster_id())
    process = launch(jvm, paths)
    deadline = time.monotonic() + settings.kafka_start_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            paths.pid_file.unlink(missing_ok=True)
            raise InfraError(
                f"the broker exited with code {process.returncode} during start-up:\n"
                + log_tail(paths),
                code="broker_start_failed",
            )
        if answers_metadata(settings.bootstrap_servers, timeout_s=2.0, auth=platform_auth(settings)):
            return broker_status(settings)
        time.sleep(0.5)
    terminate(process.pid)
    paths.pid_file.unlink(missing_ok=True)
    raise InfraError(
        f"the broker did not answer on {settings.bootstrap_servers} within "
        f"{settings.kafka_start_timeout_s:.0f}s:\n" + log_tail(paths),
        code="broker_start_timeout",
    )


def stop_broker(settings: Settings) -> BrokerStatus:
    """Stop the broker named by the PID file (SIGTERM, then SIGKILL after a bound).

    The status after; its detail names the process stopped, if there was one.
    """
    paths = paths_for(settings)
    pid = read_pid(paths.pid_file)
    stopped = pid if pid is not None and pid_alive(pid) else None
    if stopped is not None:
        terminate(stopped)
    paths.pid_file.unlink(missing_ok=True)
    status = broker_status(settings)
    return replace(status, detail=f"stopped broker pid {stopped}; {status.detail}") if stopped else status


def reset_broker(settings: Settings) -> None:
    """Stop the broker and delete its storage (every topic and offset)."""
    stop_broker(settings)
    shutil.rmtree(paths_for(settings).root, ignore_errors=True)


def jvm_command(settings: Settings, paths: BrokerPaths, java: str, classpath: str, *, heap: str) -> list[str]:
    """The ``java`` command line (without the main class) of the broker whose files are ``paths``."""
    return [java, f"-Dkafka.logs.dir={paths.logs}", f"-Dlog4j2.configurationFile={settings.kafka_home / 'log4j2.yaml'}",
            f"-Xms{heap}", f"-Xmx{heap}", *_JVM_PERFORMANCE, "-cp", classpath]


def launch(jvm: list[str], paths: BrokerPaths) -> subprocess.Popen[bytes]:
    """Start the broker of ``paths`` in its own session (it outlives the CLI) and write its PID file."""
    with paths.console_log.open("ab") as console:
        process = subprocess.Popen([*jvm, "kafka.Kafka", str(paths.config)], stdout=console,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    paths.pid_file.write_text(str(process.pid))
    return process


def new_cluster_id() -> str:
    """A random KRaft cluster id (16 bytes, URL-safe base64), shared by every node of a cluster."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _write_credentials(paths: BrokerPaths) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    secret = {"admin_user": PLATFORM_USER, "admin_password": secrets.token_hex(24),
              "controller_password": secrets.token_hex(24)}
    descriptor = os.open(paths.credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(secret, out)


def _render_config(settings: Settings, paths: BrokerPaths) -> None:
    secure = paths.credentials.exists()
    name = "server-secure.properties" if secure else "server.properties"
    template = string.Template((settings.kafka_home / name).read_text())
    paths.config.write_text(template.substitute(
        host=settings.kafka_host,
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
        log_dirs=paths.log_dirs,
        **(json.loads(paths.credentials.read_text()) if secure else {}),
    ))


def format_storage(jvm: list[str], paths: BrokerPaths, cluster_id: str) -> None:
    """Format the KRaft storage of ``paths`` once, as a node of ``cluster_id``."""
    scram = []
    if paths.credentials.exists():  # the platform principal must exist before the broker can log in
        secret = json.loads(paths.credentials.read_text())
        scram = ["--add-scram",
                 f"SCRAM-SHA-512=[name={secret['admin_user']},password={secret['admin_password']}]"]
    result = subprocess.run(
        # One argument, not two: an id that starts with "-" (urlsafe base64 has it) would read as an option.
        [*jvm, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(paths.config), *scram],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if result.returncode != 0:
        raise InfraError(
            # Java prints the cause first and the stack trace after it: keep the head.
            f"formatting KRaft storage failed (exit {result.returncode}):\n"
            f"{(result.stderr or result.stdout)[:1500]}",
            code="broker_format_failed",
        )


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise InfraError("java was not found on PATH; install a Java 17+ runtime", code="java_missing")
    return java


def require_jars(kafka_home: Path) -> str:
    libs = kafka_home / "libs"
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise InfraError(
            f"the Kafka jars are missing from {libs}; fetch them with "
            f"`mvn -q -f {kafka_home / 'pom.xml'} dependency:copy-dependencies` (or `make setup`)",
            code="broker_missing",
        )
    return f"{libs}/*"


def require_free_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InfraError(
                f"port {host}:{port} is already taken ({exc.strerror}); stop what holds it or "
                "set KEEL_KAFKA_PORT / KEEL_KAFKA_CONTROLLER_PORT",
                code="port_in_use",
            ) from exc


def answers_metadata(bootstrap: str, *, timeout_s: float, auth: dict[str, Any]) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:  # a cheap TCP probe first, so a dead port does not cost the full client timeout
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError:
        return False
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **auth}, logger=SilentLogger())
    try:
        admin.list_topics(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - any failure means "not answering"
        return False
    return True


class SilentLogger:
    """Swallows librdkafka's connection-refused chatter during health probes."""

    def log(self, *_args: object, **_kwargs: object) -> None:
        return None

    def __getattr__(self, _name: str) -> object:
        return self.log


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def terminate(*pids: int) -> None:
    """SIGTERM every one of ``pids`` at once, then SIGKILL those still alive after a bound."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def log_tail(paths: BrokerPaths, lines: int = 30) -> str:
    for log in (paths.server_log, paths.console_log):
        if log.exists() and log.stat().st_size:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            return f"--- last lines of {log} ---\n" + "\n".join(tail)
    return "(the broker wrote no log)"
