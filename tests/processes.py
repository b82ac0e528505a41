"""Running `keel` subcommands as real processes against a test's topics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from confluent_kafka.admin import AdminClient

from keel.config import Settings
from keel.kafka.clients import admin_config


def keel_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that points a `keel` process at ``settings``' broker, topics and data dir
    (never the user's default ``.keel``: keys, outbox, heartbeats and chDB stay the test's)."""
    return {**os.environ, "KEEL_TOPIC_PREFIX": settings.topic_prefix,
            "KEEL_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
            "KEEL_DATA_DIR": str(settings.data_dir), **extra}


class KeelProcess:
    """One `python -m keel.cli ARGS` process at a time, its output appended to a log file."""

    def __init__(self, args: list[str], settings: Settings, log: Path, **env: str) -> None:
        self.args, self.log, self.env = args, log, keel_env(settings, **env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> None:
        """Start the process; ``env`` adds to (or overrides) the environment for this start only."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "keel.cli", *self.args],
                                            env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT)

    def stop(self, *, sig: signal.Signals = signal.SIGTERM, grace_s: float = 15.0) -> None:
        """Send ``sig``; SIGKILL if the process still lives after ``grace_s``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL, no grace."""
        self.stop(sig=signal.SIGKILL, grace_s=10.0)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        """The log so far (over all the process's lives)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def count(self, text: str) -> int:
        """How often ``text`` appears in the log so far."""
        return self.output().count(text)

    def assert_alive(self) -> None:
        assert self.alive(), f"`keel {' '.join(self.args)}` exited:\n" + self.output()[-3000:]


def remove_app_state(settings: Settings, app_id: str) -> None:
    """Delete the topics and consumer group a faust app created (test cleanup)."""
    admin = AdminClient(admin_config(settings))
    own = [name for name in admin.list_topics(timeout=10).topics if name.startswith(app_id)]
    if own:
        for future in admin.delete_topics(own, operation_timeout=30).values():
            future.exception()
    for future in admin.delete_consumer_groups([app_id]).values():
        future.exception()


@contextmanager
def running(services: dict[str, list[str]], settings: Settings, logs: Path,
            **env: str) -> Iterator[dict[str, KeelProcess]]:
    """Each ``keel`` service (name -> arguments) as a process with ``env``, logging to ``logs/<name>.log``;
    stopped, with their faust watchers' local state removed, afterwards."""
    processes = {name: KeelProcess(args, settings, logs / f"{name}.log", **env) for name, args in services.items()}
    for process in processes.values():
        process.start()
    try:
        yield processes
    finally:
        for process in processes.values():
            process.stop(grace_s=15)
        remove_app_state(settings, f"{settings.topic_prefix}.approval-watcher")
