"""Governance commands: approvals, undo, kill switches, breakers, policies, dead letters.

Each one sends a command through the same governed processor as any agent's, so it is
authorized, decided, evented and audited like everything else. ``--as kind:id`` names
the acting principal; in production these actions come through the gateway, where the
caller's API key binds it.
"""

from __future__ import annotations

import json
import tomllib
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from keel.cli import output
from keel.cli.files import read_text
from keel.cli.output import AsJson
from keel.cli.tenancy import require_known
from keel.config import Settings
from keel.domain.envelope import Actor, Authority, Payload, new_command
from keel.domain.governance.pipeline import CONTROLS_AGGREGATE
from keel.domain.governance.policy import SYSTEM_ACTOR, parse_policy
from keel.domain.messages import (
    ApproveCommand,
    RejectCommand,
    ResetBreaker,
    SetKillSwitch,
    SetPolicy,
    SwitchScope,
)
from keel.errors import KeelError, ValidationError
from keel.ops import dlq as dead_letters
from keel.ops.lookup import parked_aggregate, pending_approvals, tenant_events
from keel.ops.undo import compensation_of
from keel.sdk.producer import CommandProducer

console = Console()
Tenant = Annotated[str, typer.Option(help="The tenant acted in.")]
As = Annotated[str, typer.Option("--as", help="Acting principal as kind:id, e.g. human:jane.lead.")]


def register(app: typer.Typer) -> None:
    """Add the governance commands and groups to ``app``."""
    app.command()(approve)
    app.command()(reject)
    app.command()(undo)
    approvals = typer.Typer(help="Commands waiting for approval.", no_args_is_help=True)
    approvals.command("list")(approvals_list)
    app.add_typer(approvals, name="approvals")
    switch = typer.Typer(help="Kill switches per tenant: an agent or a command type.", no_args_is_help=True)
    switch.command("engage")(kill_switch_engage)
    switch.command("release")(kill_switch_release)
    app.add_typer(switch, name="kill-switch")
    breaker = typer.Typer(help="Circuit breakers of agents.", no_args_is_help=True)
    breaker.command("reset")(breaker_reset)
    app.add_typer(breaker, name="breaker")
    policy = typer.Typer(help="Tenant policies (roles, grants, rules, limits).", no_args_is_help=True)
    policy.command("apply")(policy_apply)
    app.add_typer(policy, name="policy")
    dlq = typer.Typer(help="Dead letters: list, show, redrive.", no_args_is_help=True)
    dlq.command("list")(dlq_list)
    dlq.command("show")(dlq_show)
    dlq.command("redrive")(dlq_redrive)
    app.add_typer(dlq, name="dlq")


def approve(command_id: uuid.UUID, tenant: Tenant, acting: As,
            comment: Annotated[str | None, typer.Option(help="Why.")] = None) -> None:
    """Approve (or, as its subject, confirm) a command waiting for approval."""
    settings = Settings()
    aggregate = parked_aggregate(settings, tenant, command_id)
    _send(settings, ApproveCommand(command_id=command_id, comment=comment), tenant, aggregate, acting_actor(acting))


def reject(command_id: uuid.UUID, tenant: Tenant, acting: As,
           reason: Annotated[str, typer.Option(help="Why it must not run.")]) -> None:
    """Refuse a command waiting for approval."""
    settings = Settings()
    aggregate = parked_aggregate(settings, tenant, command_id)
    _send(settings, RejectCommand(command_id=command_id, reason=reason), tenant, aggregate, acting_actor(acting))


def undo(command_id: uuid.UUID, tenant: Tenant, acting: As,
         reason: Annotated[str, typer.Option(help="Why it is undone.")]) -> None:
    """Issue the compensating command of an executed command, as its domain declares it (``Undo``)."""
    settings = Settings()
    undoing = compensation_of(settings, tenant, command_id, reason)
    _send(settings, undoing.payload, tenant, undoing.aggregate_id, acting_actor(acting),
          causation_id=undoing.causation_id, correlation_id=undoing.correlation_id)


_APPROVAL_COLUMNS = (("command_id", "command id"), ("aggregate", "aggregate"), ("type", "type"),
                     ("actor", "actor"), ("on_behalf_of", "on behalf of"), ("kind", "kind"), ("rule", "rule"),
                     ("expires", "expires"))


def approvals_list(tenant: Tenant, as_json: AsJson = False) -> None:
    """Show the commands of a tenant that wait for approval or confirmation."""
    settings = Settings()
    records = [{"command_id": str(command_id), "aggregate": aggregate, "type": parked.command.type,
                "actor": f"{parked.command.actor.kind}:{parked.command.actor.id}",
                "on_behalf_of": parked.command.on_behalf_of, "kind": parked.kind.value, "rule": parked.policy_rule,
                "expires": parked.expires_at.isoformat(timespec="seconds")}
               for aggregate, state in pending_approvals(settings, tenant).items()
               for command_id, parked in state.pending.items()]
    empty = None
    if not records:  # only now read the events again: is the tenant idle, or unknown?
        seen = bool(tenant_events(settings, tenant))
        require_known(settings, tenant, seen=seen)
        empty = f"tenant {tenant} has no pending approvals" if seen else f"tenant {tenant} has no events yet"
    output.emit(records, as_json=as_json, empty=empty,
                shown=output.table(_APPROVAL_COLUMNS, records, title=f"pending approvals of {tenant}"))


def kill_switch_engage(tenant: Tenant, reason: Annotated[str, typer.Option()],
                       agent: Annotated[str | None, typer.Option(help="Agent id to switch off.")] = None,
                       command_type: Annotated[str | None, typer.Option(help="Command type to switch off.")] = None,
                       acting: As = f"{SYSTEM_ACTOR.kind}:{SYSTEM_ACTOR.id}") -> None:
    """Switch an agent or a command type off for the tenant, at once."""
    _switch(tenant, agent, command_type, True, reason, acting)


def kill_switch_release(tenant: Tenant, reason: Annotated[str, typer.Option()],
                        agent: Annotated[str | None, typer.Option()] = None,
                        command_type: Annotated[str | None, typer.Option()] = None,
                        acting: As = f"{SYSTEM_ACTOR.kind}:{SYSTEM_ACTOR.id}") -> None:
    """Switch an agent or a command type back on."""
    _switch(tenant, agent, command_type, False, reason, acting)


def breaker_reset(tenant: Tenant, agent: Annotated[str, typer.Option()], reason: Annotated[str, typer.Option()],
                  acting: As = f"{SYSTEM_ACTOR.kind}:{SYSTEM_ACTOR.id}") -> None:
    """Close an agent's open circuit breaker."""
    _send(Settings(), ResetBreaker(agent_id=agent, reason=reason), tenant, CONTROLS_AGGREGATE, acting_actor(acting))


def policy_apply(path: Path, tenant: Tenant, acting: As = f"{SYSTEM_ACTOR.kind}:{SYSTEM_ACTOR.id}") -> None:
    """Validate a policy file (JSON or TOML) and publish it as the tenant's policy."""
    text = read_text(path)
    try:
        document = json.dumps(tomllib.loads(text)) if path.suffix == ".toml" else text
        policy = parse_policy(document)
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(f"{path} is not TOML: {exc}", code="malformed_policy") from exc
    except ValidationError as exc:
        raise ValidationError(f"{path}: {exc.message}", code=exc.code, field=exc.field) from exc
    _send(Settings(), SetPolicy(document=document), tenant, CONTROLS_AGGREGATE, acting_actor(acting))
    console.print(f"policy version {policy.version} sent for {tenant}")


def dlq_list(code: Annotated[str | None, typer.Option(help="Only this error code.")] = None,
             as_json: AsJson = False) -> None:
    """List dead letters with their reasons."""
    records = [{"position": letter.position, "code": letter.code, "reason": letter.reason, "source": letter.source,
                "key": (letter.key or b"").decode(errors="replace")}
               for letter in dead_letters.dead_letters(Settings(), code)]
    columns = tuple((name, name) for name in ("position", "code", "reason", "source", "key"))
    output.emit(records, as_json=as_json, shown=output.table(columns, records, title="dead letters"),
                empty="no dead letters" + (f" with code {code}" if code else ""))


def dlq_show(position: Annotated[str, typer.Argument(help="partition:offset")]) -> None:
    """Show one dead letter: reason, headers and the original bytes."""
    letter = dead_letters.find(Settings(), position)
    console.print(f"[bold]{letter.position}[/bold] {letter.code}: {letter.reason}")
    for key, value in letter.headers:
        console.print(f"  {key}: {value.decode(errors='replace')}")
    console.print(f"  value ({len(letter.value or b'')} bytes): {(letter.value or b'')[:200]!r}")


def dlq_redrive(position: Annotated[str | None, typer.Argument(help="partition:offset")] = None,
                all_letters: Annotated[bool, typer.Option("--all", help="Every dead letter (with --code)")] = False,
                code: Annotated[str | None, typer.Option()] = None) -> None:
    """Send dead letters back to their source topic (after a fix); duplicates are deduped."""
    settings = Settings()
    if (position is None) == (not all_letters):
        raise KeelError("give one partition:offset, or --all", code="bad_arguments")
    letters = [dead_letters.find(settings, position)] if position else dead_letters.dead_letters(settings, code)
    console.print(f"redrove {dead_letters.redrive(settings, letters)} dead letter(s)")


def _switch(tenant: str, agent: str | None, command_type: str | None, engaged: bool, reason: str,
            acting: str) -> None:
    if (agent is None) == (command_type is None):
        raise KeelError("give exactly one of --agent or --command-type", code="bad_arguments")
    scope, target = (SwitchScope.AGENT, agent) if agent else (SwitchScope.COMMAND_TYPE, command_type)
    assert target is not None
    payload = SetKillSwitch(scope=scope, target=target, engaged=engaged, reason=reason)
    _send(Settings(), payload, tenant, CONTROLS_AGGREGATE, acting_actor(acting))


def acting_actor(spec: str) -> Actor:
    """The actor an ``--as kind:id`` option names."""
    kind, _, actor_id = spec.partition(":")
    try:
        return Actor.model_validate({"kind": kind, "id": actor_id})
    except Exception as exc:
        raise ValidationError(f"--as must be kind:id with kind agent, human or service, not {spec!r}",
                              code="bad_actor", field="as") from exc


def _send(settings: Settings, payload: Payload, tenant: str, aggregate: str, actor: Actor,
          causation_id: uuid.UUID | None = None, correlation_id: uuid.UUID | None = None) -> None:
    command = new_command(payload, tenant_id=tenant, aggregate_id=aggregate, actor=actor,
                          authority=Authority(), causation_id=causation_id, correlation_id=correlation_id)
    with CommandProducer(settings) as producer:
        producer.send(command)
    console.print(f"sent {command.type} {command.id} to {tenant}/{aggregate}; "
                  f"follow it with `keel query` or the events topic")
