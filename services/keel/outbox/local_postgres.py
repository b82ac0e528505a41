"""A throwaway local PostgreSQL server (Debian's binaries) for tests and benchmarks.

Like ``keel.kafka.broker`` for Kafka: initdb into a folder, start on a port with the unix
socket in that folder, stop by data folder. PostgreSQL refuses to run as root, so as root
it runs as the ``postgres`` system user (created by Debian's package).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from keel.errors import InfraError

# Faster, and only for throwaway test data: a crash may lose acknowledged commits.
UNSAFE_FAST = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off",)


def find_binaries(configured: str | None = None) -> Path:
    """The folder of ``initdb``/``pg_ctl``: ``configured`` or the newest /usr/lib/postgresql/*/bin."""
    if configured:
        return Path(configured)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise InfraError("PostgreSQL is not installed (apt-get install postgresql)", code="postgres_missing")
    return found[-1].parent


@dataclass(frozen=True)
class LocalPostgres:
    """A running server: its folder, port and binaries."""

    root: Path
    port: int
    binaries: Path

    @property
    def dsn(self) -> str:
        """The DSN of its ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        """Stop the server at once and delete its folder."""
        subprocess.run(_as_owner([str(self.binaries / "pg_ctl"), "-D", str(self.root / "data"), "-m",
                                  "immediate", "stop"]), capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(root: Path, port: int, binaries: Path, *, settings: tuple[str, ...] = ()) -> LocalPostgres:
    """initdb into ``root`` (an empty folder) and start a server on ``port``."""
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data = root / "data"
    init = subprocess.run(_as_owner([str(binaries / "initdb"), "-D", str(data), "-U", "postgres",
                                     "--auth=trust", "-E", "UTF8", "--no-sync"]),
                          capture_output=True, text=True, timeout=120, check=False)
    if init.returncode != 0:
        raise InfraError(f"initdb failed: {init.stderr[-1500:]}", code="postgres_init_failed")
    options = " ".join((f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200", *settings))
    started = subprocess.run(
        _as_owner([str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                   "-w", "-t", "60", "start"]), capture_output=True, text=True, timeout=90, check=False)
    if started.returncode != 0:
        log = (root / "log").read_text(errors="replace")[-2000:] if (root / "log").exists() else ""
        raise InfraError(f"PostgreSQL did not start: {started.stderr}\n{log}", code="postgres_start_failed")
    return LocalPostgres(root, port, binaries)


def _as_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv
