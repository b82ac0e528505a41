"""Reading an audit export: a line that is not a record or a checkpoint is a typed error naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.trust.errors import AuditFormatError
from keel.trust.store import read_export


@pytest.mark.parametrize("line", [
    "{not json",
    "[1]",
    '"a string"',
    '{"record": "not base64!"}',
    '{"checkpoint": [1]}',
    '{"checkpoint": {"v": 1, "tenant": "acme"}}',
])
def test_a_malformed_export_line_is_an_audit_format_error_naming_file_and_line(tmp_path: Path, line: str) -> None:
    export = tmp_path / "export.jsonl"
    export.write_text(f'{{"record": "AAAA"}}\n\n{line}\n')
    with pytest.raises(AuditFormatError) as caught:
        read_export(export, "acme")
    assert caught.value.code == "audit_format"
    assert caught.value.message.startswith(f"{export}:3: ")
