"""Every Keel service on one machine, supervised: what ``keel dev`` runs and ``keel status`` reports.

Each service is a ``keel`` subcommand in a child process of its own session (so a
terminal's Ctrl-C reaches the supervisor, which then stops the services in order), with
its output appended to ``<data dir>/logs/<service>.log``. A service that ends unasked is
started again after a wait that grows while it keeps failing; a transactional worker
whose heartbeat goes stale is killed first. The supervisor keeps a state file
(``<data dir>/run/<prefix>.dev.json``: every service's pid, state and restarts) that
``keel status`` reads and ``keel down`` uses to stop everything, even after the
supervisor itself was killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from keel.config import Settings
from keel.supervision.probes import ask_ready
from keel.supervision.progress import Heartbeat, heartbeat_path, liveness, replace_json
from keel.supervision.resilient import FIRST_WAIT_S, HEALTHY_RUN_S, LONGEST_WAIT_S
from keel.supervision.supervisor import SUPERVISOR_PID, frozen

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0
INSTANCE = "dev"


@dataclass(frozen=True)
class Service:
    """One service of the platform: its name, its ``keel`` arguments, and the heartbeat it writes, if any."""

    name: str
    args: tuple[str, ...]
    heartbeat_role: str | None = None


SERVICES = (
    Service("gateway", ("gateway",)),
    Service("relay", ("relay",)),
    Service("processor", ("process", "--no-supervise", "--instance", INSTANCE), heartbeat_role="processor"),
    Service("chainer", ("chain", "--no-supervise", "--instance", INSTANCE), heartbeat_role="chainer"),
    Service("effects", ("effects", "run", "--no-supervise", "--instance", INSTANCE), heartbeat_role="effects"),
    Service("projector", ("project", "--follow")),
    Service("stats-watcher", ("watch", "stats")),
    Service("breaker-watcher", ("watch", "breakers")),
    Service("approval-watcher", ("watch", "approvals")),
)


@dataclass
class ServiceState:
    """What the supervisor knows of one service now."""

    name: str
    pid: int | None = None
    state: str = "starting"  # starting | running | restarting | stopped
    restarts: int = 0
    started_at: float = 0.0  # wall clock
    last_exit: str | None = None


@dataclass
class PlatformState:
    """The state file: the supervisor's pid and every service's state."""

    supervisor_pid: int
    services: dict[str, ServiceState] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        """Replace the state file in one rename."""
        replace_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> PlatformState | None:
        """The state in ``path``, or ``None`` when there is none."""
        try:
            raw = json.loads(path.read_text())
            return cls(raw["supervisor_pid"], {name: ServiceState(**s) for name, s in raw["services"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            return None


def state_path(settings: Settings) -> Path:
    """Where the platform supervisor of ``settings``' topics keeps its state."""
    return settings.data_dir / "run" / f"{settings.topic_prefix}.dev.json"


def log_path(settings: Settings, service: str) -> Path:
    """Where a service's output goes."""
    return settings.data_dir / "logs" / f"{service}.log"


def alive(pid: int | None) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    if pid is None:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def health(settings: Settings, service: Service, state: ServiceState) -> str | None:
    """Why ``service`` is not healthy, or ``None`` when it is."""
    if not alive(state.pid):
        return f"not running ({state.state}{'; last exit: ' + state.last_exit if state.last_exit else ''})"
    if service.heartbeat_role is None:  # readiness from its metrics server's /readyz, when it publishes one
        from keel.observability.exporter import published  # the exporter imports supervision: import late

        served = [t.address for t in published(settings) if t.service == service.name and t.pid == state.pid]
        return ask_ready(served[0]) if served else None
    beat = Heartbeat.read(heartbeat_path(settings, service.heartbeat_role, INSTANCE))
    if beat is not None and beat.pid != state.pid:
        return "starting: no heartbeat from this process yet"
    problem = liveness(beat, time.time(), stale_after_s=10.0)
    if problem is None and beat is not None and not beat.ready:
        return f"not ready: {beat.not_ready}"
    return problem


class PlatformSupervisor:
    """Starts every service, restarts what ends, and stops them all on request."""

    def __init__(self, settings: Settings, services: tuple[Service, ...] = SERVICES,
                 on_change: Callable[[PlatformState], None] = lambda _state: None) -> None:
        self.settings, self.services, self.on_change = settings, services, on_change
        self.state = PlatformState(os.getpid(), {s.name: ServiceState(s.name) for s in services})
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._waits = {s.name: FIRST_WAIT_S for s in services}
        self._due: dict[str, float] = {s.name: 0.0 for s in services}  # monotonic time of the next start

    def run(self, stop: threading.Event) -> None:
        """Supervise until ``stop`` is set, then stop every service."""
        path = state_path(self.settings)
        try:
            while not stop.is_set():
                for service in self.services:
                    self._tend(service)
                self.state.write(path)
                self.on_change(self.state)
                stop.wait(1.0)
        finally:
            self.stop_all()
            path.unlink(missing_ok=True)

    def _tend(self, service: Service) -> None:
        state, child = self.state.services[service.name], self._children.get(service.name)
        if child is not None and child.poll() is None:
            frozen = self._frozen(service, child)
            if frozen is None:
                state.state = "running"
                return
            log.error("%s (pid %d) is frozen: %s; killing it", service.name, child.pid, frozen)
            child.kill()
            child.wait()
        if child is not None:  # it ended unasked
            state.last_exit = f"exit code {child.returncode}"
            ran_s = time.time() - state.started_at
            self._waits[service.name] = FIRST_WAIT_S if ran_s >= HEALTHY_RUN_S else \
                min(self._waits[service.name] * 2, LONGEST_WAIT_S)
            self._due[service.name] = time.monotonic() + self._waits[service.name]
            state.restarts += 1
            state.state, state.pid = "restarting", None
            del self._children[service.name]
            log.warning("%s ended with %s; starting it again in %.0fs (see %s)", service.name, state.last_exit,
                        self._waits[service.name], log_path(self.settings, service.name))
        if time.monotonic() >= self._due[service.name]:
            self._start(service, state)

    def _frozen(self, service: Service, child: subprocess.Popen[bytes]) -> str | None:
        if service.heartbeat_role is None:
            return None
        beat = Heartbeat.read(heartbeat_path(self.settings, service.heartbeat_role, INSTANCE))
        running_s = time.time() - self.state.services[service.name].started_at
        return frozen(beat, child.pid, running_s, self.settings.watchdog_stall_s)

    def _start(self, service: Service, state: ServiceState) -> None:
        logs = log_path(self.settings, service.name)
        logs.parent.mkdir(parents=True, exist_ok=True)
        with logs.open("ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "keel.cli", *service.args], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env={**os.environ, SUPERVISOR_PID: str(os.getpid())},
                start_new_session=True)  # Ctrl-C reaches the supervisor, which stops services in order
        self._children[service.name] = child
        state.pid, state.state, state.started_at = child.pid, "starting", time.time()
        log.info("%s started as pid %d", service.name, child.pid)

    def stop_all(self) -> None:
        """SIGINT to every service (each finishes its batch), SIGKILL to any still running after the grace."""
        for child in self._children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, child in self._children.items():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not stop within %.0fs; killing it", name, child.pid, STOP_GRACE_S)
                child.kill()
                child.wait()
            self.state.services[name].state, self.state.services[name].pid = "stopped", None
        self._children.clear()


def stop_platform(settings: Settings, timeout_s: float = STOP_GRACE_S + 15) -> list[str]:
    """Stop a running ``keel dev`` (and any service it left behind); returns what was stopped."""
    path = state_path(settings)
    state = PlatformState.read(path)
    if state is None:
        return []
    stopped = []
    if alive(state.supervisor_pid):
        os.kill(state.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while alive(state.supervisor_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        stopped.append(f"keel dev (pid {state.supervisor_pid})")
    for service in state.services.values():  # a supervisor killed with SIGKILL leaves its services
        if alive(service.pid) and service.pid is not None:
            os.kill(service.pid, signal.SIGKILL)
            stopped.append(f"{service.name} (pid {service.pid})")
    path.unlink(missing_ok=True)
    return stopped
