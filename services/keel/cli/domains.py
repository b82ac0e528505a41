"""``keel domains list|show`` and ``keel demo``: what the registered domains declare."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keel.cli import output
from keel.cli.output import AsJson
from keel.contracts.catalog import load_catalog
from keel.domains.model import Domain
from keel.domains.registry import current
from keel.errors import KeelError
from keel.trust.fields import personal_fields


def register(app: typer.Typer) -> None:
    """Add ``keel domains`` and ``keel demo`` to ``app``."""
    group = typer.Typer(help="The domains this installation governs (entry points and KEEL_DOMAINS).",
                        no_args_is_help=True)
    group.command("list")(domains_list)
    group.command("show")(domains_show)
    app.add_typer(group, name="domains")
    app.command("demo")(demo)


def describe(domain: Domain) -> dict[str, Any]:
    """A domain's commands, events, personal fields, undos, schema versions, views and rules."""
    catalog = load_catalog()

    def types(kind: str, classes: tuple[type, ...]) -> list[dict[str, Any]]:
        return [{"type": cls.__name__, "kind": kind,
                 "aggregate": current().aggregate_of[cls.__name__].name,
                 "schema_versions": sorted({s.payload_version for s in catalog.by_type.get(cls.__name__, ())}),
                 "personal_fields": list(personal_fields(cls.__name__, catalog))} for cls in classes]

    return {
        "name": domain.name, "home": str(domain.home),
        "aggregates": [{"name": a.name, "id_pattern": a.id_pattern} for a in domain.aggregates],
        "types": types("command", domain.commands) + types("event", domain.events),
        "undo": [{"event": event.__name__, "undone_by": undo.by.__name__} for event, undo in domain.undo.items()],
        "policy_rules": [rule.name for rule in domain.policy],
        "views": list(domain.views),
    }


def domains_list(as_json: AsJson = False) -> None:
    """List the registered domains."""
    records = [{"name": d.name, "aggregates": ", ".join(a.name for a in d.aggregates),
                "commands": len(d.commands), "events": len(d.events), "undoable": len(d.undo),
                "views": ", ".join(d.views)} for d in current().domains]
    columns = (("name", "domain"), ("aggregates", "aggregates"), ("commands", "commands"), ("events", "events"),
               ("undoable", "undoable events"), ("views", "views"))
    output.emit(records, as_json=as_json, empty="no domain is registered (entry points keel.domains, KEEL_DOMAINS)",
                shown=output.table(columns, records, title="registered domains"))


def domains_show(name: Annotated[str, typer.Argument(help="The domain's name.")], as_json: AsJson = False) -> None:
    """Show a domain's commands, events, personal fields, compensations and schema versions."""
    described = describe(current().domain(name))
    if as_json:
        output.write_json(described)
        return
    console = output.console()
    console.print(f"domain {described['name']} ({described['home']})", markup=False, highlight=False)
    for aggregate in described["aggregates"]:
        console.print(f"  aggregate {aggregate['name']}: ids match {aggregate['id_pattern']}", markup=False,
                      highlight=False)
    rows = [{**t, "schema_versions": ", ".join(f"v{v}" for v in t["schema_versions"]),
             "personal_fields": ", ".join(t["personal_fields"]) or "-",
             "undone_by": next((u["undone_by"] for u in described["undo"] if u["event"] == t["type"]), "-")}
            for t in described["types"]]
    columns = (("type", "type"), ("kind", "kind"), ("aggregate", "aggregate"), ("schema_versions", "schemas"),
               ("personal_fields", "personal fields"), ("undone_by", "undone by"))
    console.print(output.table(columns, rows, title=f"types of {name}"))
    console.print(f"  default policy rules: {', '.join(described['policy_rules']) or 'none'}", markup=False,
                  highlight=False)
    console.print(f"  views: {', '.join(described['views']) or 'none'}", markup=False, highlight=False)


def demo(domain: Annotated[str | None, typer.Option(help="Whose demo (default: the first that has one).")] = None
         ) -> None:
    """Play a registered domain's demo story on the local broker and chDB."""
    chosen = [current().domain(domain)] if domain else [d for d in current().domains if d.demo is not None]
    if not chosen or chosen[0].demo is None:
        raise KeelError(f"{'domain ' + domain if domain else 'no registered domain'} has no demo", code="no_demo")
    chosen[0].demo()
