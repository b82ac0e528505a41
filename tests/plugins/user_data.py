"""Guard: a test run leaves a user's own Keel installation exactly as it found it.

A user's installation is what ``keel demo`` / ``keel up`` and their workers use: the topics
under the default prefix (``KEEL_TOPIC_PREFIX``, ``keel``) on the local broker, and the state
files under the default data dir (``KEEL_DATA_DIR``, ``.keel``): the gateway's outbox, the key
store and master key, the audit signing keys, the embedded chDB. Tests use their own topic
prefixes and temporary data dirs; this plugin proves it.

* At configuration time it records the user's effective settings, then points
  ``KEEL_DATA_DIR`` and ``KEEL_TOPIC_PREFIX`` of this process (and so of every subprocess and
  ``CliRunner`` call that inherits the environment) at a throw-away folder and prefix, so a
  test that forgets to pass its own still cannot reach the user's data.
* The session-scoped autouse fixture ``user_installation_unchanged`` snapshots the end offsets
  (high watermarks) of every ``<prefix>.*`` topic and the size and mtime of every guarded file
  when the session starts, compares at the end, and fails the session naming what changed.
  The broker's own files (``<data_dir>/kafka``) change all the time and are not looked at.

The guard assumes nothing else writes to the user's installation while the tests run (no
``keel demo`` or default-prefix workers at the same time).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]  # re-exported without __all__

from keel.config import Settings

# Under the data dir: files and folders that hold a user's data (folders: every file inside).
GUARDED = ("outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3-shm", "outbox.sqlite3-journal",
           "keys.db", "keys.db-wal", "keys.db-shm", "keys.db-journal", "master.key", "audit-keys", "chdb",
           "replays")
# Folders whose entries are named after a topic prefix (heartbeats, faust state): tests must add none.
NAMED_BY_PREFIX = ("run", "watchers")

FileState = tuple[int, int]  # (mtime_ns, size)
RETRY = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART}


@dataclass(frozen=True)
class Installation:
    """What a user's installation held at one moment."""

    prefix: str
    data_dir: Path
    offsets: dict[tuple[str, int], int] | None  # (topic, partition) -> end offset; None: broker unreachable
    files: dict[str, FileState] = field(default_factory=dict)  # path relative to data_dir -> state
    entries: frozenset[str] = frozenset()  # "run/x", "watchers/y": names in NAMED_BY_PREFIX folders


def end_offsets(settings: Settings, prefix: str, timeout_s: float = 10.0) -> dict[tuple[str, int], int] | None:
    """End offset of each partition of each ``<prefix>.*`` topic, or None if the broker does not answer."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers, **settings.kafka_auth()})
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException:
        return None
    wanted = {TopicPartition(name, partition): OffsetSpec.latest()  # type: ignore[no-untyped-call]  # untyped upstream
              for name, topic in metadata.topics.items() if name.startswith(f"{prefix}.")
              for partition in topic.partitions}
    if not wanted:
        return {}
    deadline = time.monotonic() + 3 * timeout_s
    while True:  # a partition's leader may move (new topic, broker restart): ask again
        try:
            return {(tp.topic, tp.partition): future.result().offset
                    for tp, future in admin.list_offsets(wanted, request_timeout=timeout_s).items()}
        except KafkaException as exc:
            if time.monotonic() > deadline or not (exc.args[0].retriable() or exc.args[0].code() in RETRY):
                raise
            time.sleep(0.25)


def file_states(data_dir: Path) -> tuple[dict[str, FileState], frozenset[str]]:
    """Size and mtime of every guarded file, and the names in the prefix-named folders."""
    files: dict[str, FileState] = {}
    for name in GUARDED:
        path = data_dir / name
        for found in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            try:
                stat = found.stat()
            except FileNotFoundError:
                continue
            files[str(found.relative_to(data_dir))] = (stat.st_mtime_ns, stat.st_size)
    entries = frozenset(f"{folder}/{entry.name}" for folder in NAMED_BY_PREFIX
                        if (data_dir / folder).is_dir() for entry in (data_dir / folder).iterdir())
    return files, entries


def snapshot(settings: Settings, timeout_s: float = 10.0) -> Installation:
    """The installation ``settings`` name (prefix, data dir), as it is now."""
    files, entries = file_states(settings.data_dir)
    return Installation(settings.topic_prefix, settings.data_dir,
                        end_offsets(settings, settings.topic_prefix, timeout_s), files, entries)


def changes(before: Installation, after: Installation) -> list[str]:
    """What differs between two snapshots, one readable line each (empty: nothing changed)."""
    found: list[str] = []
    if before.offsets is not None and after.offsets is not None:
        for key in sorted(before.offsets.keys() | after.offsets.keys()):
            topic, partition = key
            old, new = before.offsets.get(key), after.offsets.get(key)
            if old is None:
                found.append(f"topic {topic} partition {partition} appeared (end offset {new})")
            elif new is None:
                found.append(f"topic {topic} partition {partition} disappeared (end offset was {old})")
            elif new != old:
                found.append(f"topic {topic} partition {partition}: end offset {old} -> {new} "
                             f"({new - old:+d} records)")
    for name in sorted(before.files.keys() | after.files.keys()):
        old_state, new_state = before.files.get(name), after.files.get(name)
        path = before.data_dir / name
        if old_state is None:
            found.append(f"file {path} was created ({new_state[1] if new_state else 0} bytes)")
        elif new_state is None:
            found.append(f"file {path} was deleted")
        elif new_state != old_state:
            found.append(f"file {path} was modified (size {old_state[1]} -> {new_state[1]} bytes)")
    for entry in sorted(after.entries - before.entries):
        found.append(f"{before.data_dir / entry} was created")
    return found


def report(before: Installation, after: Installation) -> str:
    lines = changes(before, after)
    return (f"the tests changed the user's installation (topic prefix {before.prefix!r}, "
            f"data dir {before.data_dir}); tests must use their own topic prefix and data dir:\n  - "
            + "\n  - ".join(lines)) if lines else ""


# The user's settings, read before this plugin points KEEL_DATA_DIR / KEEL_TOPIC_PREFIX elsewhere.
USER = Settings()
_SAFETY_DIR: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Whatever a test forgets to override, defaults to a throw-away data dir and topic prefix."""
    global _SAFETY_DIR
    _SAFETY_DIR = Path(tempfile.mkdtemp(prefix="keel-test-data-"))
    os.environ["KEEL_DATA_DIR"] = str(_SAFETY_DIR)
    os.environ["KEEL_TOPIC_PREFIX"] = f"test-session-{uuid.uuid4().hex[:8]}"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SAFETY_DIR is not None:
        shutil.rmtree(_SAFETY_DIR, ignore_errors=True)


_before: list[Installation] = []


def broker_started() -> None:
    """Called once the session's broker answers: take the topic baseline if the broker was down at the start."""
    if _before and _before[0].offsets is None:
        _before[0] = replace(_before[0], offsets=end_offsets(USER, USER.topic_prefix))


@pytest.fixture(scope="session", autouse=True)
def user_installation_unchanged() -> Iterator[Installation]:
    """Fail the session if the tests wrote to the user's default topics or data files."""
    _before[:] = [snapshot(USER, timeout_s=5.0)]
    yield _before[0]
    before, after = _before.pop(), snapshot(USER)
    message = report(before, after)
    if message:
        pytest.fail(message, pytrace=False)
