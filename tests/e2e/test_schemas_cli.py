"""`keel schemas check` and `keel schemas freeze` as a team runs them on its own domain.

The team's package (``team_dns``, ``tests/third_domain.py``) is written without schemas
into a temporary folder and named with ``KEEL_DOMAINS``; each step is a real `keel` process.
No broker is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastavro import parse_schema
from fastavro.schema import to_parsing_canonical_form

from tests.third_domain import DOMAIN, PACKAGE, SCHEMAS, write_domain

KEEL = [sys.executable, "-m", "keel.cli"]


def keel(team: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEEL_DOMAINS": PACKAGE, "COLUMNS": "300",
           "PYTHONPATH": os.pathsep.join(p for p in (str(team), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([*KEEL, "schemas", *args], env=env, text=True, capture_output=True, timeout=120,
                          check=False)


def canonical(schema: dict[str, object]) -> str:
    return to_parsing_canonical_form(parse_schema(schema, _force=True))


def test_a_team_freezes_its_schemas_and_check_refuses_what_would_break_old_records(tmp_path: Path) -> None:
    package = write_domain(tmp_path, schemas=False)

    missing = keel(tmp_path, "check", "--domain", DOMAIN, "--json")
    assert missing.returncode == 1, missing.stderr
    report = json.loads(missing.stdout)
    assert report["ok"] is False
    assert {(p["type"], p["code"]) for p in report["domains"][0]["problems"]} == {
        (name, "schema_missing") for _, name in SCHEMAS}

    frozen = keel(tmp_path, "freeze", "--domain", DOMAIN)
    assert frozen.returncode == 0, frozen.stderr
    assert frozen.stdout.count("wrote ") == len(SCHEMAS)
    for (kind, name), expected in SCHEMAS.items():
        written = json.loads((package / "schemas" / kind / name / "v1.avsc").read_text())
        assert canonical(written) == canonical(expected), name

    checked = keel(tmp_path, "check")  # every domain and Keel's own
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"ok {DOMAIN}: 6 types, 6 schema versions" in checked.stdout
    assert "ok keel:" in checked.stdout

    messages = package / "messages.py"
    original = messages.read_text()
    marker = "    previous_ttl: int | None = None\n"
    messages.write_text(original.replace(marker, marker + "    zone_owner: str\n"))
    outdated = keel(tmp_path, "check", "--domain", DOMAIN)
    assert outdated.returncode == 1
    assert "RecordSet.zone_owner [schema_outdated]" in outdated.stdout and "keel schemas freeze" in outdated.stdout

    refused = keel(tmp_path, "freeze", "--domain", DOMAIN)
    assert refused.returncode == 1
    assert "[schema_incompatible] RecordSet" in refused.stderr and "zone_owner" in refused.stderr
    assert not (package / "schemas" / "events" / "RecordSet" / "v2.avsc").exists()

    messages.write_text(original.replace(marker, marker + "    zone_owner: str | None = None\n"))
    evolved = keel(tmp_path, "freeze", "--domain", DOMAIN)
    assert evolved.returncode == 0, evolved.stderr
    assert "RecordSet v2: field 'zone_owner' is new in the model" in evolved.stdout
    assert "set `schema_version: ClassVar[int] = 2` on RecordSet" in evolved.stdout
    v1 = json.loads((package / "schemas" / "events" / "RecordSet" / "v1.avsc").read_text())
    assert canonical(v1) == canonical(SCHEMAS[("events", "RecordSet")])  # released versions stay as they were
