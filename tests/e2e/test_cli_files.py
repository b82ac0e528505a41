"""Files named on the `keel` command line: a missing, unusable or malformed one is one typed line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

KEEL = [sys.executable, "-m", "keel.cli"]

READERS: dict[str, Callable[[str], list[str]]] = {
    "submit": lambda path: ["submit", path],
    "policy apply": lambda path: ["policy", "apply", path, "--tenant", "acme"],
    "audit verify --records": lambda path: ["audit", "verify", "--tenant", "acme", "--records", path],
    "audit verify --from-checkpoint": lambda path: ["audit", "verify", "--tenant", "acme", "--from-checkpoint", path],
}


def keel(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``keel`` with its own data dir and no reachable broker: a file error must come first."""
    trusted = tmp_path / "trusted"
    trusted.mkdir(exist_ok=True)
    env = {**os.environ, "KEEL_DATA_DIR": str(tmp_path / "data"), "KEEL_KAFKA_BOOTSTRAP": "127.0.0.1:9",
           "KEEL_AUDIT_TRUSTED_KEYS_DIR": str(trusted), "COLUMNS": "200"}
    return subprocess.run([*KEEL, *args], env=env, text=True, capture_output=True, timeout=60, check=False)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``error [code] ...`` line a failed command printed."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    return line


@pytest.mark.parametrize("command", READERS)
def test_a_missing_file_is_file_not_found_naming_it(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "absent.json"
    line = one_error_line(keel(tmp_path, *READERS[command](str(missing))))
    assert line == f"error [file_not_found] {missing}: No such file or directory"


@pytest.mark.parametrize("command", READERS)
def test_a_directory_instead_of_a_file_is_file_unreadable_naming_it(tmp_path: Path, command: str) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    line = one_error_line(keel(tmp_path, *READERS[command](str(folder))))
    assert line == f"error [file_unreadable] {folder}: Is a directory"


@pytest.mark.parametrize("command", READERS)
def test_a_file_that_is_not_text_is_file_unreadable(tmp_path: Path, command: str) -> None:
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    line = one_error_line(keel(tmp_path, *READERS[command](str(binary))))
    assert line.startswith(f"error [file_unreadable] {binary}: not UTF-8 text")


@pytest.mark.parametrize(("command", "content", "expected"), [
    ("submit", '{"type": "IssueRefund",\n oops}', "[malformed_json] {path} is not JSON: "),
    ("policy apply", '{"version": "1",\n oops}', "[malformed_policy] {path}: policy is not JSON: "),
    ("audit verify --records", '{"record": "AAAA"}\n{"record": 5}\n', "[audit_format] {path}:2: "),
    ("audit verify --from-checkpoint", "[1]\n", "[audit_format] {path}:1: "),
])
def test_malformed_content_is_a_typed_error_naming_the_file(tmp_path: Path, command: str, content: str,
                                                            expected: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    line = one_error_line(keel(tmp_path, *READERS[command](str(bad))))
    assert line.startswith("error " + expected.format(path=bad)), line
    if command in ("submit", "policy apply"):
        assert line.endswith("at line 2 column 2")


def test_keygen_into_a_file_instead_of_a_folder_is_file_unwritable(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    line = one_error_line(keel(tmp_path, "audit", "keygen", "--key-id", "k2", "--dir", str(taken / "keys")))
    assert line == f"error [file_unwritable] {taken / 'keys'}: Not a directory"


def test_verifying_an_export_without_records_says_nothing_was_verified(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = keel(tmp_path, "audit", "verify", "--tenant", "acme", "--records", str(empty))
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("NOTHING tenant=acme: no audit records")
