"""Schema evolution of a domain's types (minimal: a full checker replaces this)."""

from __future__ import annotations

from dataclasses import dataclass

from keel.domains.model import Domain


@dataclass(frozen=True)
class SchemaProblem:
    type_name: str
    field: str | None
    message: str
    code: str = "schema_missing"


def schema_problems(domain: Domain) -> list[SchemaProblem]:
    """Every way ``domain``'s models and schema folder disagree."""
    problems = []
    for kind, types in (("commands", domain.commands), ("events", domain.events)):
        for cls in types:
            if not any((domain.schemas / kind / cls.__name__).glob("v*.avsc")):
                problems.append(SchemaProblem(cls.__name__, None, f"has no schema under {domain.schemas / kind}; "
                                              "run `keel schemas freeze`"))
    return problems
