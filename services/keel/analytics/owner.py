"""Who owns the embedded engine, and where it serves the others.

chDB lets one process open a data path. The process that projects opens it, serves it over
a local ClickHouse-compatible HTTP address (``keel.analytics.server``) and publishes that
address in ``<data dir>/run/analytics-<path digest>.json``; every other process (the
gateway, ``keel query``, ``keel state``, rebuilds, erasure's redaction) finds the file and
talks to the owner with an ordinary HTTP client. A file whose process is gone, or whose
address does not answer, is stale and ignored. A ClickHouse server DSN bypasses all this.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from pathlib import Path

from keel.config import Settings
from keel.supervision.platform import alive
from keel.supervision.progress import replace_json


def address_file(settings: Settings) -> Path:
    """Where the owner of ``settings``' chDB path publishes its address."""
    digest = hashlib.sha256(settings.analytics_dsn.encode()).hexdigest()[:16]
    return settings.data_dir / "run" / f"analytics-{digest}.json"


def publish(settings: Settings, port: int) -> Path:
    """Say that this process owns the engine and serves it on ``port``."""
    path = address_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_json(path, {"pid": os.getpid(), "port": port, "dsn": settings.analytics_dsn})
    return path


def withdraw(settings: Settings) -> None:
    """Remove this process's published address (another process's is left alone)."""
    path = address_file(settings)
    owner = _read(path)
    if owner is not None and owner.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def served_dsn(settings: Settings) -> str | None:
    """The owner's HTTP DSN when another live process serves ``settings``' chDB path, else ``None``."""
    dsn = published_dsn(settings)
    if dsn is None:
        return None
    try:
        with urllib.request.urlopen(f"{dsn}/ping", timeout=2) as answer:  # noqa: S310 (a local address we wrote)
            return dsn if answer.status == 200 else None
    except OSError:
        return None


def published_dsn(settings: Settings) -> str | None:
    """The address another live process published for ``settings``' chDB path, without asking it
    (``served_dsn`` also checks that it answers): cheap enough to check before every query."""
    owner = _read(address_file(settings))
    if owner is None or owner.get("pid") == os.getpid() or owner.get("dsn") != settings.analytics_dsn:
        return None
    pid, port = owner.get("pid"), owner.get("port")
    if not isinstance(pid, int) or not isinstance(port, int) or not alive(pid):
        return None
    return f"http://127.0.0.1:{port}"


def _read(path: Path) -> dict[str, object] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None
