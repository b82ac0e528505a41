"""``keel schemas freeze|check``: the Avro schemas of every domain's commands and events.

Both load the registered domains without the schema check every other command runs at
start (``registry.build(check_schemas=False)``): they are what a team runs when that
check refuses a domain. ``keel`` names Keel's own governance types, checked like a domain.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keel.cli import output
from keel.cli.output import AsJson
from keel.contracts.evolution import KEEL, Owner, SchemaProblem, freeze, keel_owner, owner_of, problems, released
from keel.domains.registry import build, load, sources

DomainOption = Annotated[str | None, typer.Option(
    "--domain", help="Only this registered domain (`keel`: Keel's own types). Default: every one and Keel's.")]


def register(app: typer.Typer) -> None:
    """Add ``keel schemas`` to ``app``."""
    group = typer.Typer(help="The Avro schemas of every domain's commands and events: freeze and check.",
                        no_args_is_help=True)
    group.command("freeze")(schemas_freeze)
    group.command("check")(schemas_check)
    app.add_typer(group, name="schemas")


def owners(name: str | None) -> list[Owner]:
    """Keel's own types and every registered domain's, or only the one called ``name``."""
    if name == KEEL:
        return [keel_owner()]
    registry = build((load(source) for source in sources()), check_schemas=False)
    if name is not None:
        return [owner_of(registry.domain(name))]
    return [keel_owner(), *(owner_of(domain) for domain in registry.domains)]


def schemas_freeze(domain: DomainOption = None) -> None:
    """Write each changed model's schema as its type's next version; released versions are never edited.

    Refuses, writing nothing, a change that would leave older records unreadable.
    """
    written = freeze(owners(domain))
    for frozen in written:
        output.say(f"wrote {frozen.path} ({frozen.type_name} v{frozen.version}: {frozen.change})")
        if frozen.cls.schema_version != frozen.version:
            output.say(f"  now set `schema_version: ClassVar[int] = {frozen.version}` on {frozen.type_name}")
    if not written:
        output.say("nothing to freeze: every model matches its newest schema")


def schemas_check(domain: DomainOption = None, as_json: AsJson = False) -> None:
    """Prove that models match their newest schemas and every older version is still readable.

    Exits 1, listing every problem, when one is not.
    """
    results = [(owner, problems(owner)) for owner in owners(domain)]
    if as_json:
        output.write_json({"ok": not any(found for _, found in results),
                           "domains": [_summary(owner, found) for owner, found in results]})
    else:
        for owner, found in results:
            summary = _summary(owner, found)
            if not found:
                output.say(f"ok {owner.name}: {summary['types']} types, {summary['versions']} schema versions; "
                           "models match their newest schemas and every older version is readable")
                continue
            output.say(f"FAILED {owner.name}: {len(found)} problem{'s' if len(found) > 1 else ''}")
            for problem in found:
                where = problem.type_name + (f".{problem.field}" if problem.field else "")
                output.say(f"  {where} [{problem.code}] {problem.message}")
    if any(found for _, found in results):
        raise typer.Exit(1)


def _summary(owner: Owner, found: list[SchemaProblem]) -> dict[str, Any]:
    return {"domain": owner.name, "types": len(owner.types),
            "versions": sum(len(released(owner.folder(cls))) for cls in owner.types),
            "problems": [{"type": p.type_name, "field": p.field, "code": p.code, "message": p.message} for p in found]}
