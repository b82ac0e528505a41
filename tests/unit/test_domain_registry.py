"""The domain registry: all registered domains load, or the process refuses to start, naming
the domain and the type at fault; and the core names no example domain's types."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from keel.config import PROJECT_ROOT
from keel.domains import Aggregate, Command, Domain, Event, Undo
from keel.domains.registry import DomainError, Source, build, current, load, sources


class Ping(Command):
    target: str


class Pinged(Event):
    target: str


class Unpinged(Event):
    target: str


def _decide(state: int, command: object) -> list[Event]:
    return [Pinged(target="x")]


def _evolve(state: int, event: object) -> int:
    return state + 1


PINGER = Aggregate(name="pinger", initial=0, commands=(Ping,), events=(Pinged, Unpinged),
                   decide=_decide, evolve=_evolve)


def _domain(tmp_path: Path, name: str = "pings", **changes: object) -> Domain:
    domain = Domain(name=name, home=tmp_path, aggregates=(PINGER,),
                    undo={Pinged: Undo(by=Unpinged, command=lambda event, reason: Ping(target="back"))})
    return replace(domain, **changes)  # type: ignore[arg-type]


def test_a_domain_that_fails_to_import_is_named_with_its_error() -> None:
    with pytest.raises(DomainError) as raised:
        load(Source("broken", "keel_no_such_module_anywhere:domain"))
    assert raised.value.code == "domain_import_failed" and raised.value.domain == "broken"
    assert "ModuleNotFoundError" in raised.value.message


def test_an_import_path_naming_something_else_than_a_domain_is_refused() -> None:
    with pytest.raises(DomainError, match="not a keel.domains.Domain"):
        load(Source("odd", "keel.config:PROJECT_ROOT"))


def test_two_domains_claiming_one_type_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DomainError) as raised:
        build([_domain(tmp_path), _domain(tmp_path, name="other")], check_schemas=False)
    assert (raised.value.code, raised.value.domain, raised.value.type_name) == ("duplicate_type", "other", "Ping")


def test_a_domain_type_named_like_a_core_type_is_refused(tmp_path: Path) -> None:
    clash = type("ApproveCommand", (Command,), {"__annotations__": {"x": str}})
    aggregate = replace(PINGER, commands=(clash,))
    with pytest.raises(DomainError, match="also declared by 'keel'"):
        build([_domain(tmp_path, aggregates=(aggregate,))], check_schemas=False)


def test_an_aggregate_without_decide_or_evolve_is_refused(tmp_path: Path) -> None:
    for role in ("decide", "evolve"):
        aggregate = replace(PINGER, **{role: cast(Any, None)})
        with pytest.raises(DomainError, match=f"aggregate 'pinger' has no {role} function") as raised:
            build([_domain(tmp_path, aggregates=(aggregate,))], check_schemas=False)
        assert raised.value.code == "aggregate_incomplete"


def test_a_compensation_naming_an_unknown_type_is_refused(tmp_path: Path) -> None:
    stranger = type("Stranger", (Event,), {"__annotations__": {"x": str}})
    undo = {Pinged: Undo(by=stranger, command=lambda event, reason: Ping(target="back"))}
    with pytest.raises(DomainError) as raised:
        build([_domain(tmp_path, undo=undo)], check_schemas=False)
    assert (raised.value.code, raised.value.type_name) == ("unknown_compensation_type", "Stranger")


def test_a_model_without_a_schema_stops_the_start_naming_the_type(tmp_path: Path) -> None:
    with pytest.raises(DomainError) as raised:
        build([_domain(tmp_path)])
    assert raised.value.domain == "pings" and raised.value.type_name == "Ping"
    assert raised.value.code == "schema_missing"


def test_keel_domains_adds_import_paths_to_the_entry_points() -> None:
    named = sources("support_desk:domain, some.team.domain ,")
    assert [s.path for s in named].count("support_desk:domain") == 1  # the entry point and the env var agree
    assert named[-1] == Source("some.team.domain", "some.team.domain")


def test_both_example_domains_are_registered_through_their_entry_points() -> None:
    assert {"support_desk", "deploys"} <= {domain.name for domain in current().domains}


def test_no_example_domain_type_is_named_in_the_core() -> None:
    names = {cls.__name__ for domain in current().domains if domain.name in ("support_desk", "deploys")
             for cls in (*domain.commands, *domain.events)}
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    offenders = [f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}"
                 for path in sorted((PROJECT_ROOT / "services" / "keel").rglob("*"))
                 if path.is_file() and path.suffix in {".py", ".sql", ".avsc", ".json", ".md"}
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert len(names) > 10 and offenders == []
    imported = {module for path in (PROJECT_ROOT / "services").rglob("*.py")
                for module in re.findall(r"^\s*(?:from|import) ([\w.]+)", path.read_text(), re.M)}
    assert not {m for m in imported if m.split(".")[0] in ("support_desk", "deploys")}


def test_a_process_refuses_to_start_with_a_domain_that_fails_to_import(tmp_path: Path) -> None:
    (tmp_path / "half_done.py").write_text("import no_such_dependency_of_this_team\n")
    env = {**os.environ, "KEEL_DOMAINS": "half_done", "PYTHONPATH": str(tmp_path), "KEEL_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "keel.cli", "process", "--no-supervise"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[domain_import_failed] domain 'half_done': cannot import half_done" in result.stderr
    assert "no_such_dependency_of_this_team" in result.stderr and "Traceback" not in result.stderr


def test_keel_domains_show_prints_types_personal_fields_undos_and_schema_versions() -> None:
    result = subprocess.run([sys.executable, "-m", "keel.cli", "domains", "show", "support_desk", "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    types = {t["type"]: t for t in shown["types"]}
    assert types["SendEmail"]["personal_fields"] == ["to_address", "body"]
    assert types["IssueRefund"] == {"type": "IssueRefund", "kind": "command", "aggregate": "subscription",
                                    "schema_versions": [1], "personal_fields": []}
    assert {"event": "RefundIssued", "undone_by": "RefundReversed"} in shown["undo"]
    assert shown["views"] == ["refund_totals"]
    unknown = subprocess.run([sys.executable, "-m", "keel.cli", "domains", "show", "nope"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "[unknown_domain] no domain 'nope' is registered" in unknown.stderr
