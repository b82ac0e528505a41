"""The guard of the user's installation (tests/plugins/user_data.py) can fail, and sees real writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keel.config import Settings
from keel.kafka.topics import Topic, topic_name
from keel.trust.store import produce_raw
from tests.plugins.user_data import USER, Installation, changes, report, snapshot

pytestmark = pytest.mark.integration


def installation(tmp_path: Path, offsets: dict[tuple[str, int], int] | None = None,
                 files: dict[str, tuple[int, int]] | None = None, entries: frozenset[str] = frozenset()) -> Installation:
    return Installation("keel", tmp_path, {("keel.audit-intake", 0): 0} if offsets is None else offsets,
                        files or {"keys.db": (1, 16384)}, entries)


def test_an_unchanged_installation_reports_nothing(tmp_path: Path) -> None:
    assert changes(installation(tmp_path), installation(tmp_path)) == []
    assert report(installation(tmp_path), installation(tmp_path)) == ""


def test_a_moved_end_offset_is_reported_with_topic_partition_and_count(tmp_path: Path) -> None:
    before = installation(tmp_path)
    after = installation(tmp_path, offsets={("keel.audit-intake", 0): 440})

    assert changes(before, after) == ["topic keel.audit-intake partition 0: end offset 0 -> 440 (+440 records)"]
    assert "tests must use their own topic prefix and data dir" in report(before, after)


def test_a_created_default_topic_and_touched_files_are_reported(tmp_path: Path) -> None:
    before = installation(tmp_path, offsets={}, files={"keys.db": (1, 16384)})
    after = installation(tmp_path, offsets={("keel.commands", 3): 0},
                         files={"keys.db": (2, 20480), "outbox.sqlite3": (3, 4096)}, entries=frozenset({"run/x.json"}))

    assert changes(before, after) == [
        "topic keel.commands partition 3 appeared (end offset 0)",
        f"file {tmp_path / 'keys.db'} was modified (size 16384 -> 20480 bytes)",
        f"file {tmp_path / 'outbox.sqlite3'} was created (4096 bytes)",
        f"{tmp_path / 'run/x.json'} was created",
    ]


def test_a_broker_that_did_not_answer_leaves_only_the_files_compared(tmp_path: Path) -> None:
    before = installation(tmp_path, offsets={})
    assert changes(Installation("keel", tmp_path, None, before.files), installation(tmp_path)) == []


def test_a_snapshot_sees_records_on_the_prefix_and_writes_to_guarded_files_but_not_the_broker_files(
        settings: Settings, tmp_path: Path) -> None:
    own = settings.model_copy(update={"data_dir": tmp_path})
    (tmp_path / "kafka").mkdir()
    (tmp_path / "chdb").mkdir()
    before = snapshot(own)
    assert before.offsets and all(topic.startswith(f"{own.topic_prefix}.") for topic, _ in before.offsets)

    produce_raw(own, Topic.AUDIT_INTAKE, [(b"acme", b"x")] * 3, partition=1)
    (tmp_path / "kafka" / "00000000.log").write_bytes(b"broker files change all the time")
    (tmp_path / "chdb" / "data.bin").write_bytes(b"rows")
    (tmp_path / "master.key").write_bytes(os.urandom(32))
    found = changes(before, snapshot(own))

    intake = topic_name(own, Topic.AUDIT_INTAKE)
    assert found == [f"topic {intake} partition 1: end offset 0 -> 3 (+3 records)",
                     f"file {tmp_path / 'chdb/data.bin'} was created (4 bytes)",
                     f"file {tmp_path / 'master.key'} was created (32 bytes)"]


def test_tests_run_away_from_the_users_data_dir_and_prefix(settings: Settings) -> None:
    assert settings.data_dir != USER.data_dir and settings.topic_prefix != USER.topic_prefix
    assert Settings().data_dir != USER.data_dir and Settings().topic_prefix != USER.topic_prefix
